"""Reading Triton ``config.pbtxt`` files into :class:`ModelConfig` (runs in the front).

The text is parsed by protobuf's ``text_format`` against ``model_config.proto``, which
has the field names and numbers of Triton's own schema, so a file parses here exactly
as Triton parses it. Then every field is either

- **used** (name, platform/backend, max_batch_size, input, output (and its
  label_filename), instance_group,
  dynamic_batching, sequence_batching, model_warmup, version_policy, parameters,
  default_model_filename),
- **accepted and reported** in :attr:`ModelConfig.notes` because it means nothing
  here (optimization, response_cache, metric_tags, rate_limiter, host_policy), or
  accepted silently because it changes nothing (an input's
  ``format``, ``model_transaction_policy { decoupled: false }``, ``runtime`` naming
  the LibTorch backend), or
- **refused** with a :class:`ConfigError` naming the field and its ``file:line``.

docs/configuration.md lists them all, with the reasons.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, cast

from google.protobuf import text_format

from ..errors import ConfigError
from . import model_config_pb2 as pb
from .batching import DynamicBatching, QueuePolicy
from .instances import InstanceGroup
from .locations import Locations
from .model import ModelConfig
from .sequences import ControlInput, SequenceBatching, SequenceState
from .tensor import TensorSpec
from .versions import VersionPolicy, version_dirs
from .warmup import ModelWarmup, WarmupInput, check_input, sample_value

__all__ = ["DEFAULT_MODEL_FILENAME", "load", "load_versions", "parse", "parse_text"]

#: The model file's name in a version directory unless ``default_model_filename`` says.
DEFAULT_MODEL_FILENAME = "model.pt"
_PLATFORMS = {"pytorch_libtorch": None, "torch_aoti": "aoti"}
_BACKENDS = {"pytorch"}
_RUNTIMES = {"": None, "libtriton_pytorch.so": None, "model.py": "python"}
#: The model file's default name by format (Triton's: model.pt2 for torch_aoti, and
#: model.py for the Python-based runtime).
_DEFAULT_FILENAMES = {"aoti": "model.pt2", "python": "model.py"}

#: Top-level fields that are refused, and why.
_REFUSED = {
    "batch_input": "batch inputs are not supported (libtorchrt does not build batches across requests)",
    "batch_output": "batch outputs are not supported (libtorchrt does not build batches across requests)",
    "cc_model_filenames": "per-compute-capability model files are not supported; name the file with "
    "default_model_filename",
    "model_repository_agents": "repository agents are not run by libtorchrt; remove the block (files would be "
    "used unchecked otherwise)",
}
#: Triton fields that this project's .proto leaves out (reserved numbers), and why.
_UNMODELLED = {
    "ensemble_scheduling": "ensembles are not served; call the models one after the other",
    "model_operations": "custom operation libraries are ONNX Runtime's; load TorchScript custom ops with "
    "torch.ops.load_library in the model's code",
    "model_metrics": "libtorchrt exports no Prometheus metrics",
}
_USED = {
    "name",
    "platform",
    "backend",
    "runtime",
    "version_policy",
    "max_batch_size",
    "input",
    "output",
    "instance_group",
    "parameters",
    "default_model_filename",
    "dynamic_batching",
    "sequence_batching",
    "model_warmup",
    "optimization",
    "response_cache",
    "metric_tags",
    "model_transaction_policy",
}
_NO_FIELD_RE = re.compile(r'Message type "(?:[\w.]+\.)?(\w+)" has no field named "(\w+)"')


_NO_ENUM_VALUE_RE = re.compile(r'Enum type "([\w.]+)" has no value named (\w+)')


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _field_names(owner: str) -> list[str]:
    """The fields of the message type named ``owner`` (its short name), for hints."""
    pending = list(pb.ModelConfig.DESCRIPTOR.file.message_types_by_name.values())
    while pending:
        d = pending.pop()
        if d.name == owner:
            return [f.name for f in d.fields]
        pending += d.nested_types
    return []


def _enum_values(full_name: str) -> list[str]:
    try:
        enum = pb.ModelConfig.DESCRIPTOR.file.pool.FindEnumTypeByName(full_name)
    except KeyError:
        return []
    return [v.name for v in enum.values]


def parse_text(text: str, where: str = "<config.pbtxt>") -> pb.ModelConfig:
    """Parse config text into the protobuf message.

    Raises:
        ConfigError: a syntax error or an unknown field (with line and column).
    """
    msg = pb.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        message = str(e)
        if line is not None:  # str(e) starts with "line:col : "
            message = message.split(" : ", 1)[-1]
        loc = f"{where}:{line}:{col}" if line is not None else where
        key = None
        m = _NO_FIELD_RE.search(message)
        if m:
            owner, key = m.groups()
            if owner == "ModelConfig" and key in _UNMODELLED:
                message = f"field {key!r} is not supported: {_UNMODELLED[key]}"
            else:
                hint = _did_you_mean(key, _field_names(owner))
                message = f"{owner} has no field {key!r} (see Triton's model_config.proto); check the spelling{hint}"
        m = _NO_ENUM_VALUE_RE.search(message)
        if m:
            message = message.rstrip(".") + _did_you_mean(m.group(2), _enum_values(m.group(1)))
        raise ConfigError(f"{loc}: {message}", key=key) from None
    return msg


def parse(text: str, where: str = "<config.pbtxt>", model_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from configuration text; no file is looked at.

    Args:
        text: the configuration.
        where: how errors name the text (its file's path).
        model_dir: the model's directory: the name when the text has none, and
            the name the text's must match. ``path`` is the model file's name.

    Raises:
        ConfigError: a syntax error, or a field refused or out of range (names the
            field and ``where:line``).
    """
    return _Reader(text, where, Path(model_dir) if model_dir is not None else None).config()


def load(source: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
    """Load a ``config.pbtxt`` (path or text) into a :class:`ModelConfig`.

    With a model directory, the highest version that the version policy serves.
    See :meth:`ModelConfig.from_pbtxt`.
    """
    text, where, directory = _source(source, model_dir)
    if directory is None:
        return parse(text, where)
    return load_versions(directory, text, where)[-1]


def load_versions(
    model_dir: str | os.PathLike[str], text: str | None = None, where: str | None = None
) -> list[ModelConfig]:
    """One :class:`ModelConfig` per version of a model that its policy serves.

    Args:
        model_dir: ``<repo>/<model>``, holding ``config.pbtxt`` and the version
            directories.
        text: the configuration (default: read ``model_dir/config.pbtxt``).
        where: how errors name it (default: the file's path).

    Returns:
        The configurations in ascending version order, each with its ``version``
        and ``path`` (``<model_dir>/<version>/<default_model_filename>``).

    Raises:
        ConfigError: the configuration is invalid, no version directory holds the
            model file, or a version the policy names is missing.
    """
    directory = Path(model_dir)
    if text is None:
        file = directory / "config.pbtxt"
        text = _read(file)
        where = where or str(file)
    reader = _Reader(text, where or str(directory / "config.pbtxt"), directory)
    cfg = reader.config()
    filename = str(cfg.path)  # as parsed: default_model_filename, relative to a version directory
    dirs = version_dirs(directory)
    available = sorted(v for v, d in dirs.items() if (d / filename).is_file())
    empty = sorted(set(dirs) - set(available))
    policy = cfg.version_policy
    missing = policy.missing(available)
    if missing:
        have = f"versions {available}" if available else "no version"
        reader.fail(
            f"version_policy asks for version(s) {missing}; {str(directory)!r} has {have} holding {filename!r}",
            "version_policy",
        )
    chosen = policy.select(available)
    if not chosen:
        reader.fail(f"no version directory of {str(directory)!r} holds {filename!r}", "default_model_filename")
    for i, spec in enumerate(cfg.outputs):  # a missing label file breaks the model now, as in Triton
        if spec.label_filename is not None and not (directory / spec.label_filename).is_file():
            reader.fail(
                f"output {spec.name!r}: label_filename {spec.label_filename!r} is not a file in {str(directory)!r}",
                "output",
                i,
                "label_filename",
            )
    for i, sample in enumerate(cfg.warmup):  # a broken warm-up file breaks the model now, not at start
        for name, feed in sample.inputs.items():
            if feed.input_data_file is not None:
                at = ("model_warmup", i, "inputs", name, "value", "input_data_file")
                reader.guard(at, _reads(sample, name, directory))
    notes = list(cfg.notes)
    if empty:
        notes.append(f"version directories {empty} hold no {filename!r}: they are not versions of this model")
    # The format the configuration names, else found from each version's file.
    declared = reader.declared_format()
    return [
        reader.guard(
            ("parameters",),
            lambda v=v: dataclasses.replace(  # type: ignore[misc]
                cfg, version=v, path=dirs[v] / filename, notes=tuple(notes), format=declared
            ),
        )
        for v in chosen
    ]


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read the configuration: {e}") from None


def _is_file(source: str) -> bool:
    if "\n" in source or "{" in source:
        return False  # configuration text, not a path
    try:
        return Path(source).is_file()
    except OSError:  # e.g. too long to be a file name
        return False


def _source(source: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None) -> tuple[str, str, Path | None]:
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _is_file(source)):
        path = Path(source)
        directory = Path(model_dir) if model_dir is not None else path.parent
        return _read(path), str(path), directory
    return str(source), "<config.pbtxt>", Path(model_dir) if model_dir is not None else None


def _dotted(path: Sequence[str | int]) -> str:
    """``("model_warmup", 0, "inputs", "x", "value", "dims")`` -> ``model_warmup.inputs.x.dims``."""
    return ".".join(p for p in path if isinstance(p, str) and p != "value")


def _warmup_input(value: Any, dtype: str, source: str) -> Callable[[], WarmupInput]:
    def build() -> WarmupInput:
        return WarmupInput(
            dtype,
            list(value.dims),
            zero_data=source == "zero_data",
            random_data=source == "random_data",
            input_data_file=value.input_data_file if source == "input_data_file" else None,
        )

    return build


def _reads(sample: ModelWarmup, name: str, directory: Path) -> Callable[[], object]:
    return lambda: sample_value(sample, name, directory)


def _declared(
    model: str, sample: str, name: str, feed: WarmupInput, inputs: Sequence[TensorSpec]
) -> Callable[[], None]:
    return lambda: check_input(model, sample, name, feed, inputs)


def _control(name: str, control: Any) -> Callable[[], ControlInput]:
    def build() -> ControlInput:
        kind = pb.ModelSequenceBatching.Control.Kind.Name(control.kind)
        pairs = {
            "int32_false_true": list(control.int32_false_true),
            "fp32_false_true": list(control.fp32_false_true),
            "bool_false_true": list(control.bool_false_true),
        }
        given = {k: v for k, v in pairs.items() if v}
        if kind == "CONTROL_SEQUENCE_CORRID":
            if given:
                raise ConfigError(
                    f"control_input {name!r}: CONTROL_SEQUENCE_CORRID takes data_type, not {next(iter(given))}"
                )
            dtype = pb.DataType.Name(control.data_type)
            if dtype == "TYPE_INVALID":
                raise ConfigError(f"control_input {name!r}: CONTROL_SEQUENCE_CORRID needs a data_type", key="data_type")
            return ControlInput(name, kind, dtype)
        if len(given) != 1:
            raise ConfigError(
                f"control_input {name!r}: {kind} needs exactly one of int32_false_true, fp32_false_true, "
                f"bool_false_true; got {sorted(given) or 'none'}",
                key="control",
            )
        key, pair = next(iter(given.items()))
        if key == "fp32_false_true":
            pair = [float(v) for v in pair]
        dtype = {"int32_false_true": "int32", "fp32_false_true": "float32", "bool_false_true": "bool"}[key]
        return ControlInput(name, kind, dtype, tuple(pair))

    return build


def _state(st: Any, directory: Path | None) -> Callable[[], SequenceState]:
    def build() -> SequenceState:
        if st.data_type == pb.TYPE_INVALID:
            raise ConfigError(f"state {st.input_name!r} has no data_type", key="data_type")
        initial: str | None = None
        initial_dims: list[int] | None = None
        if len(st.initial_state) > 1:
            raise ConfigError(f"state {st.input_name!r}: at most one initial_state", key="initial_state")
        for init in st.initial_state:
            if init.data_type not in (pb.TYPE_INVALID, st.data_type):
                raise ConfigError(
                    f"state {st.input_name!r}: initial_state data_type {pb.DataType.Name(init.data_type)} differs "
                    f"from the state's {pb.DataType.Name(st.data_type)}",
                    key="initial_state",
                )
            source = init.WhichOneof("state_data")
            if source is None:
                raise ConfigError(
                    f"state {st.input_name!r}: initial_state needs zero_data or data_file", key="initial_state"
                )
            initial = "zero" if source == "zero_data" else init.data_file
            if initial != "zero" and directory is not None and not os.path.isabs(initial):
                initial = os.path.join(directory, "initial_state", initial)  # (where Triton looks)
            initial_dims = list(init.dims)
        return SequenceState(
            st.input_name,
            st.output_name,
            pb.DataType.Name(st.data_type),
            list(st.dims),
            initial,
            initial_dims,
            st.use_same_buffer_for_input_output,
            st.use_growable_memory,
        )

    return build


class _Reader:
    """Turns one parsed configuration into a ModelConfig, failing with file:line."""

    def __init__(self, text: str, where: str, directory: Path | None) -> None:
        self.text = text
        self.where = where
        self.directory = directory
        self.msg = parse_text(text, where)
        self.locations = Locations(text)
        self.name = self.msg.name or (directory.name if directory is not None else "")
        self.notes: list[str] = []

    def fail(self, message: str, *path: str | int, key: str | None = None) -> NoReturn:
        line = self.locations.line(*path) if path else None
        loc = f"{self.where}:{line}" if line else self.where
        raise ConfigError(f"{loc}: {message}", model=self.name or None, key=key or _dotted(path) or None)

    def guard(self, path: Sequence[str | int], build: Callable[[], Any], prefix: str = "") -> Any:
        """Run ``build``; a ConfigError it raises is re-raised at ``path``'s line."""
        try:
            return build()
        except ConfigError as e:
            sub = (e.key,) if e.key and e.key not in path else ()
            self.fail(f"{prefix}{e}", *path, *sub)

    # ── the whole configuration ──────────────────────────────────────────────────

    def config(self) -> ModelConfig:
        msg = self.msg
        for fd, _ in msg.ListFields():
            if fd.name in _REFUSED:
                self.fail(f"field {fd.name!r} is not supported: {_REFUSED[fd.name]}", fd.name)
            if fd.name not in _USED:
                self.fail(f"field {fd.name!r} is not supported by libtorchrt", fd.name)
        self._check_identity()
        mbs = msg.max_batch_size
        if mbs < 0:
            self.fail(f"max_batch_size is {mbs}; expected an integer >= 0", "max_batch_size")
        inputs = [self._tensor(t, "input", i, mbs) for i, t in enumerate(msg.input)]
        outputs = [self._tensor(t, "output", i, mbs) for i, t in enumerate(msg.output)]
        for kind, specs in (("input", inputs), ("output", outputs)):
            seen: set[str] = set()
            for i, spec in enumerate(specs):
                if spec.name in seen:
                    self.fail(f"{kind} name {spec.name!r} repeats; names must differ", kind, i, "name")
                seen.add(spec.name)
        groups = [self._group(g, i) for i, g in enumerate(msg.instance_group)]
        if not groups:  # Triton: one instance on each GPU, or one on the CPU
            groups.append(InstanceGroup(1, "KIND_AUTO"))
        batching = self._batching(mbs) if msg.HasField("dynamic_batching") else None
        sequences = self._sequences() if msg.HasField("sequence_batching") else None
        warmup = [self._warmup(w, i, mbs, inputs) for i, w in enumerate(msg.model_warmup)]
        policy = self._policy()
        self._ignored()
        parameters = {key: p.string_value for key, p in msg.parameters.items()}
        filename = self._filename()
        try:
            return ModelConfig(
                name=self.name,
                path=Path(filename),
                instance_groups=groups,
                parameters=parameters,
                inputs=inputs,
                outputs=outputs,
                max_batch_size=mbs,
                dynamic_batching=batching,
                sequence_batching=sequences,
                warmup=warmup,
                version_policy=policy,
                format=self.declared_format(),
                notes=self.notes,
            )
        except ConfigError as e:
            key = e.key or ""
            if key in parameters:
                path: tuple[str, ...] = ("parameters", key, "value")
            else:
                path = ({"inputs": "input", "outputs": "output", "warmup": "model_warmup"}.get(key, key),)
            self.fail(str(e), *path, key=key or None)

    def _check_identity(self) -> None:
        msg, directory = self.msg, self.directory
        if not self.name:
            self.fail("the configuration has no 'name' and no model directory to take it from", "name")
        if directory is not None and msg.name and msg.name != directory.name:
            self.fail(f"name {msg.name!r} does not match the model directory {directory.name!r}", "name")
        if msg.platform and msg.platform not in _PLATFORMS:
            self.fail(
                f"platform {msg.platform!r} is not served; expected 'pytorch_libtorch' (TorchScript, or a "
                "torch.export .pt2 named by default_model_filename) or 'torch_aoti' (an AOTInductor package)",
                "platform",
            )
        if msg.backend and msg.backend not in _BACKENDS:
            self.fail(f"backend {msg.backend!r} is not served; expected 'pytorch'", "backend")
        if msg.runtime not in _RUNTIMES:
            self.fail(
                f"runtime {msg.runtime!r} is not served; expected 'model.py' (Triton's Python-based PyTorch "
                "runtime) or none (TorchScript and PT2 files)",
                "runtime",
            )
        if _PLATFORMS.get(msg.platform) and _RUNTIMES.get(msg.runtime):
            self.fail(f"platform {msg.platform!r} and runtime {msg.runtime!r} name two formats; give one", "runtime")
        if msg.model_transaction_policy.decoupled:
            self.fail(
                "decoupled models (any number of responses per request) are not supported",
                "model_transaction_policy",
                "decoupled",
            )

    # ── parts ─────────────────────────────────────────────────────────────────────

    def _tensor(self, t: Any, kind: str, i: int, mbs: int) -> TensorSpec:
        path: tuple[str | int, ...] = (kind, i)
        label = f"{kind} {t.name!r}" if t.name else f"{kind} #{i}"
        if not t.name:
            self.fail(f"{label} has no name", *path)
        for flag in ("is_shape_tensor", "is_non_linear_format_io", "allow_ragged_batch"):
            if getattr(t, flag, False):
                why = (
                    "shape tensors and non-linear formats are TensorRT's"
                    if flag != "allow_ragged_batch"
                    else "libtorchrt does not build batches across requests"
                )
                self.fail(f"{label}: field {flag!r} is not supported ({why})", *path, flag)
        dtype = pb.DataType.Name(t.data_type)
        if dtype == "TYPE_INVALID":
            self.fail(f"{label} has no data_type", *path, "data_type")
        dims = list(t.dims)
        if not dims:
            self.fail(
                f"{label} must give dims (Triton requires them; a scalar is dims: [ 1 ], reshape: {{ shape: [ ] }})",
                *path,
            )
        if any(d == 0 or d < -1 for d in dims):
            self.fail(f"{label}: dims {dims} must hold sizes >= 1, or -1 for any size", *path, "dims")
        if kind == "input" and t.format != pb.ModelInput.FORMAT_NONE and len(dims) != 3:
            fmt = pb.ModelInput.Format.Name(t.format)
            self.fail(f"{label}: {fmt} needs 3 dims (C, H, W without the batch); dims are {dims}", *path, "format")
        reshape = None
        if t.HasField("reshape"):
            reshape = list(t.reshape.shape)
            if not reshape and mbs == 0:
                self.fail(
                    f"{label}: an empty reshape (a scalar) needs a batching model (max_batch_size > 0)",
                    *path,
                    "reshape",
                )
            if any(d == 0 or d < -1 for d in reshape):
                self.fail(f"{label}: reshape {reshape} must hold sizes >= 1, or -1", *path, "reshape")
        labels = (t.label_filename or None) if kind == "output" else None
        optional = bool(getattr(t, "optional", False))
        spec: TensorSpec = self.guard(path, lambda: TensorSpec(t.name, dtype, dims, optional, reshape, labels))
        return spec

    def _group(self, g: Any, i: int) -> InstanceGroup:
        path = ("instance_group", i)
        label = f"instance_group {g.name!r}" if g.name else f"instance_group #{i}"
        if g.count < 0:
            self.fail(f"{label}: count is {g.count}; expected an integer >= 1 (leave it out for 1)", *path, "count")
        if g.secondary_devices:
            self.fail(f"{label}: secondary_devices are TensorRT's (NVDLA); not supported", *path, "secondary_devices")
        if g.profile:
            self.fail(f"{label}: profile is for TensorRT models only (as in Triton)", *path, "profile")
        if g.passive:
            self.fail(f"{label}: passive instances are not supported (every instance takes requests)", *path, "passive")
        if g.HasField("rate_limiter"):
            self.notes.append(f"{label}: rate_limiter is ignored (libtorchrt has no rate limiter)")
        if g.host_policy:
            self.notes.append(
                f"{label}: host_policy {g.host_policy!r} is ignored (NUMA host policies are a Triton server option)"
            )
        kind = pb.ModelInstanceGroup.Kind.Name(g.kind)
        group: InstanceGroup = self.guard(
            path, lambda: InstanceGroup(g.count or 1, kind, list(g.gpus), g.name), prefix=f"model {self.name!r}: "
        )
        return group

    def _queue_policy(self, p: Any) -> QueuePolicy:
        return QueuePolicy(
            pb.ModelQueuePolicy.TimeoutAction.Name(p.timeout_action),
            p.default_timeout_microseconds,
            p.allow_timeout_override,
            p.max_queue_size,
        )

    def _batching(self, mbs: int) -> DynamicBatching:
        b = self.msg.dynamic_batching

        def build() -> DynamicBatching:
            batching = DynamicBatching(
                list(b.preferred_batch_size),
                b.max_queue_delay_microseconds,
                b.preserve_ordering,
                b.priority_levels,
                b.default_priority_level,
                self._queue_policy(b.default_queue_policy),
                {int(k): self._queue_policy(v) for k, v in b.priority_queue_policy.items()},
            )
            batching.check(self.name, mbs)
            return batching

        batching: DynamicBatching = self.guard(("dynamic_batching",), build)
        if mbs == 0:
            self.notes.append("dynamic_batching has no effect with max_batch_size 0: requests run one by one")
        return batching

    def _sequences(self) -> SequenceBatching:
        b = self.msg.sequence_batching
        path = ("sequence_batching",)
        if b.iterative_sequence:
            self.fail("iterative_sequence is not supported (it serves decoupled models)", *path, "iterative_sequence")
        controls = []
        for i, entry in enumerate(b.control_input):
            for j, control in enumerate(entry.control):
                controls.append(self.guard((*path, "control_input", i, "control", j), _control(entry.name, control)))
        states = []
        for i, st in enumerate(b.state):
            states.append(self.guard((*path, "state", i), _state(st, self.directory)))
        strategy = b.WhichOneof("strategy_choice") or "direct"
        options: dict[str, Any] = {}
        if strategy == "direct":
            options = {
                "max_queue_delay_microseconds": b.direct.max_queue_delay_microseconds,
                "minimum_slot_utilization": b.direct.minimum_slot_utilization,
            }
        else:
            o = b.oldest
            options = {
                "max_queue_delay_microseconds": o.max_queue_delay_microseconds,
                "max_candidate_sequences": o.max_candidate_sequences,
                "preferred_batch_size": list(o.preferred_batch_size),
                "preserve_ordering": o.preserve_ordering,
            }
        return cast(
            SequenceBatching,
            self.guard(
                path,
                lambda: SequenceBatching(
                    strategy,
                    b.max_sequence_idle_microseconds,
                    controls,
                    states,
                    **options,
                ),
            ),
        )

    def _warmup(self, w: Any, i: int, mbs: int, inputs: list[TensorSpec]) -> ModelWarmup:
        path = ("model_warmup", i)
        label = f"model_warmup {w.name!r}" if w.name else f"model_warmup #{i}"
        feeds = {}
        for name, value in w.inputs.items():
            where = (*path, "inputs", name, "value")
            source = value.WhichOneof("input_data_type")
            if source is None:
                self.fail(f"{label}: input {name!r} needs one of zero_data, random_data, input_data_file", *where)
            dtype = pb.DataType.Name(value.data_type)
            if dtype == "TYPE_INVALID":
                self.fail(f"{label}: input {name!r} has no data_type", *where, "data_type")
            feed: WarmupInput = self.guard(
                where, _warmup_input(value, dtype, source), prefix=f"{label}: input {name!r}: "
            )
            self.guard(where, _declared(self.name, w.name, name, feed, inputs))
            feeds[name] = feed

        def build() -> ModelWarmup:
            sample = ModelWarmup(w.name, w.batch_size, feeds, w.count)
            sample.check(self.name, mbs, inputs)
            return sample

        sample: ModelWarmup = self.guard(path, build)
        if not sample.batch_size:
            self.notes.append(f"{label} has batch_size 0 and is skipped (as Triton does)")
        return sample

    def _policy(self) -> VersionPolicy:
        if not self.msg.HasField("version_policy"):
            return VersionPolicy()
        vp = self.msg.version_policy
        choice = vp.WhichOneof("policy_choice")
        if choice is None:
            self.fail("version_policy names no policy; expected latest { }, all { } or specific { }", "version_policy")
        if choice == "latest":
            return self.guard(("version_policy", "latest"), lambda: VersionPolicy("latest", vp.latest.num_versions))
        if choice == "all":
            return VersionPolicy("all")
        return self.guard(
            ("version_policy", "specific"), lambda: VersionPolicy("specific", versions=list(vp.specific.versions))
        )

    def _ignored(self) -> None:
        msg = self.msg
        if msg.HasField("optimization"):
            names = [fd.name for fd, _ in msg.optimization.ListFields()]
            block = f"optimization {{ {', '.join(names)} }}" if names else "optimization { }"
            self.notes.append(
                f"{block} is ignored: those are settings of Triton's own execution (CUDA graphs, execution "
                "accelerators, pinned memory, priority); each worker runs the TorchScript module with torch"
            )
        if msg.response_cache.enable:
            self.notes.append("response_cache is ignored: libtorchrt has no response cache, every request runs")
        if msg.metric_tags:
            self.notes.append(
                f"metric_tags {dict(msg.metric_tags)} are ignored: they are not added to the server's metrics"
            )

    def declared_format(self) -> str | None:
        """The format the configuration names (None: found from the model file)."""
        return _PLATFORMS.get(self.msg.platform) or _RUNTIMES.get(self.msg.runtime)

    def _filename(self) -> str:
        fmt = self.declared_format()
        name = self.msg.default_model_filename or _DEFAULT_FILENAMES.get(fmt or "", DEFAULT_MODEL_FILENAME)
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or Path(name).is_absolute():
            self.fail(
                f"default_model_filename {name!r} must name a file in the version directory (no '/' prefix, no '..')",
                "default_model_filename",
            )
        return name
