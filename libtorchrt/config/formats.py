"""Model formats: which loader serves a model file, and which parameters apply to it
(front process; configuration).

libtorchrt serves four formats, each a loader in the worker (``workers/formats/``):

============  =====================================================  ==========================
format        file                                                   Triton's ``config.pbtxt``
============  =====================================================  ==========================
torchscript   ``torch.jit.save`` archive (``model.pt``)              ``platform: "pytorch_libtorch"``
aoti          AOTInductor package (``aoti_compile_and_package``)     ``platform: "torch_aoti"``
exported      ``torch.export.save`` program (``.pt2``, no code)      (a ``.pt2`` without compiled code)
python        ``model.py`` defining an ``nn.Module`` (+ ``model.pt``)  ``runtime: "model.py"``
============  =====================================================  ==========================

:func:`detect` tells them apart by looking inside the file (its name, its zip
directory), never by unpickling it. :func:`check_parameters` refuses, at configuration
time, an execution-mode parameter that means nothing to a format (the TorchScript
executor flags to a compiled package), naming parameter, format and why.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = [
    "COMPILE_KEY",
    "FORMATS",
    "PT2_FORMATS",
    "check_parameters",
    "compile_options",
    "detect",
    "zip_kind",
]

#: Every format, in the order the docs list them.
FORMATS = ("torchscript", "aoti", "exported", "python")
#: The formats of PyTorch 2 (named inputs and outputs by call specification).
PT2_FORMATS = ("aoti", "exported", "python")
#: The parameter that asks for ``torch.compile`` (Triton's Python-based runtime's name).
COMPILE_KEY = "TORCH_COMPILE_OPTIONAL_PARAMETERS"
#: The keys ``COMPILE_KEY``'s JSON object may hold, and their types.
_COMPILE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fullgraph": bool,
    "dynamic": bool,
    "backend": str,
    "mode": str,
    "options": dict,
    "disable": bool,
}
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Parameters that only TorchScript's executor reads, and why they mean nothing to the
#: other formats (a ConfigError names both).
_TORCHSCRIPT_ONLY = {
    "DISABLE_OPTIMIZED_EXECUTION": "it switches TorchScript's graph executor optimizations",
    "ENABLE_JIT_EXECUTOR": "it switches TorchScript's profiling executor",
    "ENABLE_JIT_PROFILING": "it switches TorchScript's profiling mode",
    "ENABLE_TENSOR_FUSER": "it switches TorchScript's tensor-expression fuser",
    "ENABLE_NVFUSER": "it was TorchScript's CUDA fuser",
    "FREEZE_MODULE": "torch.jit.freeze works on TorchScript modules only",
    "OPTIMIZE_FOR_INFERENCE": "torch.jit.optimize_for_inference works on TorchScript modules only",
}
#: Parameters that only some formats read.
_ONLY: dict[str, tuple[tuple[str, ...], str]] = {
    COMPILE_KEY: (
        ("python", "exported"),
        "an AOTInductor package is compiled already, and TorchScript is not compiled by torch.compile",
    ),
    "MODULE_METHOD_NAME": (("torchscript", "python"), "a torch.export program has one entry point"),
}


def zip_kind(path: str | os.PathLike[str]) -> str | None:
    """What a zip archive holds: ``"aoti"`` (an AOTInductor package), ``"exported"``
    (a ``torch.export`` program), ``"torchscript"`` (a TorchScript archive),
    ``"checkpoint"`` (a ``torch.save`` file); None: not a zip, or none of these.

    Reads only the zip's directory.
    """
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    inner = [name.split("/", 1)[1] for name in names if "/" in name]
    if any("aotinductor" in n for n in inner):
        return "aoti"
    if any(n.startswith("models/") for n in inner) or any(n == "archive_format" for n in inner):
        return "exported"
    if any(n.startswith("code/") for n in inner) or "constants.pkl" in inner:
        return "torchscript"
    if "data.pkl" in inner:
        return "checkpoint"
    return None


def detect(path: str | os.PathLike[str]) -> str:
    """The format of the model file at ``path``: ``.py`` is ``python``; a zip is what
    :func:`zip_kind` finds; anything else is left to TorchScript (whose loader says
    what the file really is when it cannot load it)."""
    name = os.fspath(path)
    if name.endswith(".py"):
        return "python"
    kind = zip_kind(name)
    return kind if kind in ("aoti", "exported") else "torchscript"


def compile_options(model: str, raw: Any) -> dict[str, Any]:
    """Parse ``TORCH_COMPILE_OPTIONAL_PARAMETERS``: a JSON object of ``torch.compile``'s
    keyword arguments (``fullgraph``, ``dynamic``, ``backend``, ``mode``, ``options``,
    ``disable``), as Triton's Python-based PyTorch runtime reads it.

    Raises:
        ConfigError: not a JSON object, an unknown key, or a value of the wrong type.
    """
    if isinstance(raw, Mapping):
        value: Any = dict(raw)
    else:
        try:
            value = json.loads(str(raw))
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"model {model!r}: parameter {COMPILE_KEY} is not JSON ({e}); expected an object such as "
                '{"mode": "max-autotune", "fullgraph": true}',
                model=model,
                key=COMPILE_KEY,
            ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"model {model!r}: parameter {COMPILE_KEY} is {value!r}; expected a JSON object",
            model=model,
            key=COMPILE_KEY,
        )
    for key, item in value.items():
        want = _COMPILE_FIELDS.get(key)
        if want is None:
            raise ConfigError(
                f"model {model!r}: parameter {COMPILE_KEY} has key {key!r}; expected some of {sorted(_COMPILE_FIELDS)}",
                model=model,
                key=COMPILE_KEY,
            )
        if not isinstance(item, want) or (want is not bool and isinstance(item, bool)):
            name = want.__name__ if isinstance(want, type) else "/".join(t.__name__ for t in want)
            raise ConfigError(
                f"model {model!r}: parameter {COMPILE_KEY}: {key} is {item!r}; expected a {name}",
                model=model,
                key=COMPILE_KEY,
            )
    if "mode" in value and value["mode"] not in _MODES:
        raise ConfigError(
            f"model {model!r}: parameter {COMPILE_KEY}: mode {value['mode']!r}; expected one of {list(_MODES)}",
            model=model,
            key=COMPILE_KEY,
        )
    if "mode" in value and "options" in value:
        raise ConfigError(
            f"model {model!r}: parameter {COMPILE_KEY}: torch.compile takes mode or options, not both",
            model=model,
            key=COMPILE_KEY,
        )
    return value


def check_parameters(model: str, fmt: str, parameters: Mapping[str, Any], method: str = "forward") -> None:
    """Refuse the parameters that mean nothing to ``fmt``.

    Raises:
        ConfigError: names the parameter, the format and why.
    """
    for key in parameters:
        why = _TORCHSCRIPT_ONLY.get(key)
        if why is not None and fmt != "torchscript":
            raise ConfigError(
                f"model {model!r}: parameter {key} does not apply to format {fmt!r}: {why}; remove it",
                model=model,
                key=key,
            )
        only = _ONLY.get(key)
        if only is not None and fmt not in only[0]:
            raise ConfigError(
                f"model {model!r}: parameter {key} does not apply to format {fmt!r}: {only[1]}; remove it",
                model=model,
                key=key,
            )
    if method != "forward" and fmt not in _ONLY["MODULE_METHOD_NAME"][0]:
        raise ConfigError(
            f"model {model!r}: method {method!r}: format {fmt!r} has one entry point; {_ONLY['MODULE_METHOD_NAME'][1]}",
            model=model,
            key="method",
        )
    if COMPILE_KEY in parameters:
        compile_options(model, parameters[COMPILE_KEY])
