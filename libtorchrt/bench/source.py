"""What to benchmark: a workload, a TorchScript file or a model repository (bench process).

:func:`resolve` turns the command line's model arguments into a :class:`Target`: a
``ModelConfig`` template (the sweep replaces its ``instances`` and ``parameters``) and
the :class:`~libtorchrt.bench.inputs.InputSpec` of every input:

* ``--workload tiny|payload|cnn`` -- one of the standard workloads, scripted into a
  temporary directory; its input is ``INPUT__0`` of the workload's shape;
* a ``.pt`` file -- TorchScript files declare no shapes, so every input needs
  ``--input-shape NAME=d0,d1,...`` (or ``--input-file``); dtypes from ``--input-dtype``
  (default float32);
* a model repository (``<repo>/<model>/config.pbtxt``; ``--model NAME`` picks one) or a
  single model directory -- inputs from the configuration's declared ``input`` dims and
  data types, -1 dims replaced by 1 unless ``--shape-override NAME=...`` gives them.

A model served by a running server (``--endpoint``) is resolved by ``endpoint.py``,
with the same input rules (:func:`declared_inputs`, :func:`given_inputs`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from libtorchrt import ConfigError, ModelConfig, TensorSpec
from libtorchrt.config import load_repository

from . import workloads
from .inputs import InputSpec

if TYPE_CHECKING:
    from .endpoint import Endpoint

__all__ = ["InputOptions", "SourceError", "Target", "declared_inputs", "given_inputs", "resolve", "variable_dims"]


class SourceError(ValueError):
    """The model arguments do not name something benchmarkable (usage error, exit 2)."""


@dataclass
class Target:
    """A model to benchmark.

    Attributes:
        config: the model's configuration; ``instances`` is the default instance count.
        inputs: what each request carries.
        source: where it came from, in words (for the report).
        endpoint: the running server that serves it (``--endpoint``); None: the
            sweep starts its own pools.
        notes: remarks for the report (variable dims sent as 1, ...).
    """

    config: ModelConfig
    inputs: list[InputSpec]
    source: str
    endpoint: Endpoint | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class InputOptions:
    """The command line's input options, by input name (``""``: every input)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, tuple[int, ...]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _dtype(options: InputOptions, name: str, declared: str | torch.dtype | None = None) -> torch.dtype:
    """``--input-dtype NAME=...``, else the declared dtype, else ``--input-dtype D``, else float32."""
    text = options.dtypes.get(name, declared if declared is not None else options.dtypes.get("", "float32"))
    try:
        return TensorSpec(name, text).torch_dtype
    except ConfigError as exc:
        raise SourceError(f"--input-dtype for {name!r}: {exc}") from None


def _check_names(options: InputOptions, known: list[str], where: str) -> None:
    for flag, names in (
        ("--input-shape", options.shapes),
        ("--shape-override", options.overrides),
        ("--input-file", options.files),
        ("--input-dtype", options.dtypes),
    ):
        unknown = [n for n in names if n and n not in known]
        if unknown:
            raise SourceError(f"{flag} names input(s) {unknown} that {where} does not have; its inputs: {known}")


def _arg_names(path: Path, method: str = "forward") -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        return [a.name for a in getattr(module, method).schema.arguments[1:]]
    except Exception:  # only used to word an error message
        return []


def given_inputs(options: InputOptions, missing: str) -> list[InputSpec]:
    """Inputs given entirely on the command line (``--input-shape``, ``--input-file``).

    Raises:
        SourceError: none given (``missing`` is the message), or ``--shape-override``.
    """
    names = list(dict.fromkeys([*options.shapes, *options.files]))
    if not names:
        raise SourceError(missing)
    if options.overrides:
        raise SourceError("--shape-override applies to a model's declared inputs; use --input-shape here")
    _check_names(options, names, "the set of --input-shape/--input-file")
    return [InputSpec(n, options.shapes.get(n, ()), _dtype(options, n), file=options.files.get(n)) for n in names]


def _from_shapes(options: InputOptions, path: Path, what: str) -> list[InputSpec]:
    """Inputs of a model that declares none (a .pt file, or a config without inputs)."""
    if not options.shapes and not options.files:
        args = _arg_names(path)
        hint = " ".join(f"--input-shape {a}=..." for a in args) or "--input-shape NAME=d0,d1,..."
        return given_inputs(
            options,
            f"{what} declares no input shapes; give every input's shape ({hint}) or data (--input-file NAME=x.npy)",
        )
    return given_inputs(options, "")


def declared_inputs(cfg: ModelConfig, options: InputOptions) -> list[InputSpec]:
    """Inputs from a configuration's declared ``input`` block (-1 dims become 1 unless
    ``--shape-override`` gives them).

    Raises:
        SourceError: an option names an input the model does not have, or an input
            declares no dims and none are given.
    """
    declared = list(cfg.inputs)
    if not declared:
        return _from_shapes(options, Path(cfg.path), f"model {cfg.name!r}'s configuration")
    _check_names(options, [s.name for s in declared], f"model {cfg.name!r}")
    batched = cfg.max_batch_size > 0
    specs = []
    for s in declared:
        if s.name in options.shapes:  # the full shape as sent
            specs.append(InputSpec(s.name, options.shapes[s.name], _dtype(options, s.name, s.dtype), False))
            continue
        dims = options.overrides.get(s.name, s.dims)
        if dims is None:
            if s.name not in options.files:
                raise SourceError(
                    f"input {s.name!r} of model {cfg.name!r} declares no dims; "
                    f"give them with --shape-override {s.name}=..."
                )
            dims = ()
        shape = tuple(1 if d == -1 else d for d in dims)
        specs.append(InputSpec(s.name, shape, _dtype(options, s.name, s.dtype), batched, options.files.get(s.name)))
    return specs


def variable_dims(cfg: ModelConfig, options: InputOptions) -> list[str]:
    """A note for each declared input whose -1 dims are sent as 1 (no option gives them)."""
    notes = []
    for s in cfg.inputs:
        given = s.name in options.shapes or s.name in options.overrides or s.name in options.files
        if not given and s.dims is not None and -1 in s.dims:
            notes.append(
                f"input {s.name!r} declares dims {list(s.dims)}: each -1 is sent as 1 "
                f"(--shape-override {s.name}=... sets them)"
            )
    return notes


def _model_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem) or "model"


def resolve(
    model_or_repository: str | None,
    *,
    model: str | None,
    workload: str | None,
    options: InputOptions,
    workdir: Path,
) -> Target:
    """Find the model to benchmark and its inputs.

    Args:
        model_or_repository: a ``.pt`` file, a repository or a model directory.
        model: the model to pick in a repository.
        workload: a standard workload instead of a file.
        options: the input options.
        workdir: where a workload's TorchScript file is written.

    Raises:
        SourceError: nothing (or two things) named, a file or model that does not
            exist, inputs that cannot be made.
        ConfigError: the model's configuration is invalid.
    """
    if (model_or_repository is None) == (workload is None):
        raise SourceError(
            "name a model: MODEL_OR_REPOSITORY (a model file: .pt, .pt2 or model.py; or a repository) "
            "or --workload NAME"
        )
    if workload is not None:
        if workload not in workloads.WORKLOADS:
            raise SourceError(f"unknown workload {workload!r}; choose from {', '.join(workloads.names())}")
        if model is not None:
            raise SourceError("--model picks a model of a repository; it does not apply to --workload")
        w = workloads.WORKLOADS[workload]
        _check_names(options, ["INPUT__0"], f"workload {workload!r}")
        path = workloads.build(workload, workdir)
        shape = options.shapes.get("INPUT__0", w.input_shape)
        spec = InputSpec("INPUT__0", shape, _dtype(options, "INPUT__0"), file=options.files.get("INPUT__0"))
        cfg = ModelConfig(name=workload, path=path)
        return Target(cfg, [spec], f"workload {workload} ({w.description})")

    assert model_or_repository is not None
    path = Path(model_or_repository)
    if path.is_file():
        if model is not None:
            raise SourceError("--model picks a model of a repository; MODEL_OR_REPOSITORY is a file")
        cfg = ModelConfig(name=_model_name(path), path=path)
        return Target(cfg, _from_shapes(options, path, f"model file {str(path)!r}"), f"file {path}")
    if not path.is_dir():
        raise SourceError(f"{str(path)!r} is neither a model file nor a model repository")
    if (path / "config.pbtxt").is_file():  # a single model's directory
        cfg = ModelConfig.from_pbtxt(path / "config.pbtxt", path)
        if model is not None and model != cfg.name:
            raise SourceError(f"{str(path)!r} is the directory of model {cfg.name!r}, not {model!r}")
        return Target(cfg, declared_inputs(cfg, options), f"model directory {path}", notes=variable_dims(cfg, options))
    configs = {c.name: c for c in load_repository(path)}
    if model is None:
        if len(configs) > 1:
            raise SourceError(f"repository {str(path)!r} holds {sorted(configs)}; pick one with --model NAME")
        model = next(iter(configs))
    if model not in configs:
        raise SourceError(f"repository {str(path)!r} has no model {model!r}; it holds {sorted(configs)}")
    cfg = configs[model]
    return Target(
        cfg, declared_inputs(cfg, options), f"repository {path}, model {model}", notes=variable_dims(cfg, options)
    )


def parameter_values(base: Mapping[str, object], sweep: Mapping[str, str]) -> dict[str, str]:
    """The parameters of one configuration: the model's own, overridden by the sweep's."""
    merged = {str(k): str(v) for k, v in base.items()}
    merged.update(sweep)
    return merged
