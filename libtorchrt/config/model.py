"""A model's configuration in Python: :class:`ModelConfig` (runs in the front).

The fields follow Triton's ``ModelConfig`` where they exist there (``max_batch_size``,
``input``/``output`` as :class:`TensorSpec`, ``instance_group``, ``dynamic_batching``,
``model_warmup``, ``version_policy``, ``parameters``), so that a ``config.pbtxt`` and
a Python configuration mean the same thing; :meth:`ModelConfig.to_pbtxt` writes one
as the other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deadlines import check_timeout
from ..errors import ConfigError
from . import flags as flag_mod
from . import formats
from .batching import DynamicBatching, QueuePolicy
from .instances import KINDS, MAX_INSTANCES, InstanceGroup, cuda_device_count
from .sequences import ControlInput, SequenceBatching, SequenceState
from .tensor import MAX_DIMS, STRING, TRITON_DTYPES, TensorSpec, normalize_dtype
from .versions import VersionPolicy
from .warmup import ModelWarmup, WarmupInput, WarmupValue, declared_warmup, warmup_tensors

__all__ = [
    "EXECUTION_TIMEOUT_KEY",
    "KINDS",
    "LAUNCH_BLOCKING_KEY",
    "METHOD_KEY",
    "STRING",
    "TRITON_DTYPES",
    "WARMUP_RUNS_KEY",
    "ControlInput",
    "DynamicBatching",
    "InstanceGroup",
    "ModelConfig",
    "ModelWarmup",
    "QueuePolicy",
    "SequenceBatching",
    "SequenceState",
    "TensorSpec",
    "VersionPolicy",
    "WarmupInput",
    "cuda_device_count",
    "normalize_dtype",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DEVICE_RE = re.compile(r"^(cpu|cuda(?::([0-9]+))?|auto)$")
#: The parameter that names the module method to run (Triton's PyTorch backend's).
METHOD_KEY = "MODULE_METHOD_NAME"
#: The parameter that asks for warm-up runs built from the declared inputs.
WARMUP_RUNS_KEY = "WARMUP_RUNS"
#: The parameter that sets CUDA_LAUNCH_BLOCKING in the environment of the model's workers.
LAUNCH_BLOCKING_KEY = "CUDA_LAUNCH_BLOCKING"
#: The parameter that sets ``execution_timeout`` (seconds), so a repository can set it.
EXECUTION_TIMEOUT_KEY = "EXECUTION_TIMEOUT"


@dataclass
class ModelConfig:
    """How to serve one model.

    Args:
        name: the model's name, used in requests.
        path: the model file: a TorchScript archive (``torch.jit.save``), an
            AOTInductor package or a ``torch.export`` program (``.pt2``), or a
            ``model.py`` (see ``format``).
        format: ``"torchscript"``, ``"aoti"``, ``"exported"`` or ``"python"``
            (docs/formats.md); None: found from the file (its name and zip directory).
        instances: worker processes to start for this model (one process each), per
            device of ``devices``.
        devices: where the instances run: ``"cpu"``, ``"cuda"`` (every GPU),
            ``"cuda:N"``, or ``"auto"`` (every GPU if CUDA is available, else the
            CPU); ``instances`` processes start on each. Default: the CPU, unless
            ``instance_groups`` says otherwise.
        instance_groups: Triton's ``instance_group`` blocks (from ``config.pbtxt``);
            when given, they replace ``instances``/``devices``.
        parameters: execution-mode parameters, as in Triton's ``parameters`` block
            (e.g. ``{"DISABLE_OPTIMIZED_EXECUTION": "true"}``); see docs/flags.md.
        inputs: declared inputs; requests are checked against them in the front.
            Empty: inputs are bound to the model's ``forward()`` arguments only.
        outputs: declared outputs; their names key the result dict
            (default ``OUTPUT__0``, ``OUTPUT__1``, ...).
        max_batch_size: > 0 makes dim 0 a batch dimension not listed in ``dims``.
        method: the module method to run (Triton's ``MODULE_METHOD_NAME``).
        env: extra environment variables for this model's workers only.
        version: the model version (from a repository's version directory).
        max_retries: how often a request is sent again after the worker running it
            died before answering (requests queued behind it in that worker are
            always re-sent: they never ran). A request that was running in two
            workers that died fails as a poison request whatever this says.
        timeout: default deadline of a request, in seconds (None: no deadline);
            ``infer``/``submit`` take their own ``timeout``.
        execution_timeout: seconds one execution may take (None: no limit); past it
            the request fails with ``TimeoutError`` and the worker is killed and
            replaced (a hung model cannot be interrupted otherwise). The
            ``EXECUTION_TIMEOUT`` parameter sets it from a ``config.pbtxt``.
        max_request_bytes: refuse requests whose tensors add up to more (None: no
            limit), before anything is allocated.
        dynamic_batching: Triton's ``dynamic_batching`` settings (None: the block
            is absent): requests are batched together (see docs/batching.md).
        sequence_batching: Triton's ``sequence_batching`` settings (None: the block
            is absent): every request names its sequence, which sticks to one
            instance and may keep implicit state there (see docs/sequences.md).
        warmup: Triton's ``model_warmup`` samples, run by every instance before it
            is ready; or an integer N, short for ``warmup_runs=N``.
        version_policy: which versions of a repository's model are served.
        warmup_runs: zero-data warm-up runs built from the declared ``inputs``
            (``WARMUP_RUNS`` in ``parameters``), after the ``warmup`` samples.
        notes: what the configuration asked for that libtorchrt does not do
            (e.g. an ``optimization`` block); the pool warns each at start.

    ``parameters`` and the fields they set agree both ways: ``MODULE_METHOD_NAME``
    sets ``method`` (and ``method="predict"`` adds the parameter),
    ``WARMUP_RUNS`` sets ``warmup_runs`` likewise, ``EXECUTION_TIMEOUT`` sets
    ``execution_timeout`` (seconds), and ``CUDA_LAUNCH_BLOCKING``
    sets ``env["CUDA_LAUNCH_BLOCKING"]`` to ``"1"``/``"0"`` for this model's workers.

    Raises:
        ConfigError: a field or parameter value is invalid (names model, key, value).
    """

    name: str
    path: str | os.PathLike[str]
    instances: int = 1
    parameters: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[TensorSpec] = ()
    outputs: Sequence[TensorSpec] = ()
    max_batch_size: int = 0
    method: str = "forward"
    env: Mapping[str, str] = field(default_factory=dict)
    version: int = 1
    devices: Sequence[str] | str | None = None
    instance_groups: Sequence[InstanceGroup] = ()
    max_retries: int = 1
    timeout: float | None = None
    execution_timeout: float | None = None
    max_request_bytes: int | None = None
    dynamic_batching: DynamicBatching | None = None
    sequence_batching: SequenceBatching | None = None
    warmup: Sequence[ModelWarmup] = ()  # or an int: see the docstring
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    warmup_runs: int = 0
    format: str | None = None
    notes: Sequence[str] = field(default=(), compare=False)
    #: the parsed execution-mode flags (derived from ``parameters``)
    flags: flag_mod.Flags = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(
                f"model name {self.name!r} is invalid; expected letters, digits, '_', '.', '-'",
                model=str(self.name),
                key="name",
            )
        if (
            not isinstance(self.instances, int)
            or isinstance(self.instances, bool)
            or not 1 <= self.instances <= MAX_INSTANCES
        ):
            raise ConfigError(
                f"model {self.name!r}: instances is {self.instances!r}; expected an integer from 1 to {MAX_INSTANCES} "
                "(one worker process each)",
                model=self.name,
                key="instances",
            )
        mbs = self.max_batch_size
        if not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 0:
            raise ConfigError(
                f"model {self.name!r}: max_batch_size is {self.max_batch_size!r}; expected an integer >= 0",
                model=self.name,
                key="max_batch_size",
            )
        for key in ("max_retries",):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"model {self.name!r}: {key} is {value!r}; expected an integer >= 0", model=self.name, key=key
                )
        for key in ("timeout", "execution_timeout"):
            value = getattr(self, key)
            try:  # (NaN and bools refused; inf and other huge values capped: deadlines.py)
                setattr(self, key, check_timeout(value, allow_zero=False))
            except ValueError:
                raise ConfigError(
                    f"model {self.name!r}: {key} is {value!r}; expected a positive number of seconds or None",
                    model=self.name,
                    key=key,
                ) from None
        value = self.max_request_bytes
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(
                f"model {self.name!r}: max_request_bytes is {value!r}; expected a positive integer or None",
                model=self.name,
                key="max_request_bytes",
            )
        self._check_devices()
        runs: Any = self.warmup
        if isinstance(runs, int) and not isinstance(runs, bool):  # warmup=N: N runs
            self.warmup_runs, self.warmup = runs, ()
        self.parameters = {str(k): v for k, v in dict(self.parameters).items()}
        self.inputs = tuple(self.inputs)
        self.outputs = tuple(self.outputs)
        self.env = {str(k): str(v) for k, v in dict(self.env).items()}
        self.notes = tuple(str(n) for n in self.notes)
        self._sync_parameters()
        if self.format is None:
            self.format = formats.detect(self.path)
        elif self.format not in formats.FORMATS:
            raise ConfigError(
                f"model {self.name!r}: format {self.format!r}; expected one of {list(formats.FORMATS)} or None "
                "(found from the file)",
                model=self.name,
                key="format",
            )
        formats.check_parameters(self.name, self.format, self.parameters, self.method)
        self.flags = flag_mod.parse(self.name, self.parameters)
        blocking = self.flags.get(LAUNCH_BLOCKING_KEY)
        if blocking is not None:
            value = "1" if blocking else "0"
            if self.env.get(LAUNCH_BLOCKING_KEY, value) != value:
                raise ConfigError(
                    f"model {self.name!r}: parameter {LAUNCH_BLOCKING_KEY} is {self.parameters[LAUNCH_BLOCKING_KEY]!r} "
                    f"but env sets it to {self.env[LAUNCH_BLOCKING_KEY]!r}; give one",
                    model=self.name,
                    key=LAUNCH_BLOCKING_KEY,
                )
            self.env[LAUNCH_BLOCKING_KEY] = value
        for specs, kind in ((self.inputs, "input"), (self.outputs, "output")):
            names = [s.name for s in specs]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ConfigError(
                    f"model {self.name!r}: {kind} names repeat: {sorted(dup)}", model=self.name, key=f"{kind}s"
                )
            for spec in specs:
                self._check_satisfiable(spec, kind)
                if kind == "input" and isinstance(spec, TensorSpec) and spec.label_filename is not None:
                    raise ConfigError(
                        f"model {self.name!r}: input {spec.name!r} has a label_filename; only outputs have labels",
                        model=self.name,
                        key="label_filename",
                    )
        self._check_scheduling()

    def _check_satisfiable(self, spec: TensorSpec, kind: str) -> None:
        """Refuse a declared shape no request could ever carry: more dimensions than a
        tensor may have on any of our wires, or more elements than a tensor can hold."""
        if not isinstance(spec, TensorSpec) or spec.dims is None:
            return
        batch = 1 if self.max_batch_size > 0 else 0
        if len(spec.dims) + batch > MAX_DIMS:
            extra = " (plus the batch dimension)" if batch else ""
            raise ConfigError(
                f"model {self.name!r}: {kind} {spec.name!r} has {len(spec.dims)} dims{extra}; "
                f"a tensor may have at most {MAX_DIMS}",
                model=self.name,
                key="dims",
            )
        elements = max(1, self.max_batch_size)
        for d in spec.dims:
            elements *= max(d, 0)
        if elements >= 2**63:
            raise ConfigError(
                f"model {self.name!r}: {kind} {spec.name!r} has dims {list(spec.dims)}, "
                f"more than the 2**63 elements a tensor can hold",
                model=self.name,
                key="dims",
            )

    def _sync_parameters(self) -> None:
        """Make ``method``/``warmup_runs`` and their parameters agree (see the class docstring)."""
        params = dict(self.parameters)
        given = params.get(METHOD_KEY)
        if given is not None and str(given).strip():
            if self.method not in ("forward", str(given).strip()):
                raise ConfigError(
                    f"model {self.name!r}: method is {self.method!r} but parameter {METHOD_KEY} is {given!r}; give one",
                    model=self.name,
                    key=METHOD_KEY,
                )
            self.method = str(given).strip()
        elif self.method != "forward":
            params[METHOD_KEY] = self.method
        if not isinstance(self.method, str) or not self.method.isidentifier():
            raise ConfigError(
                f"model {self.name!r}: method {self.method!r} is not a method name", model=self.name, key=METHOD_KEY
            )
        runs = self.warmup_runs
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
            raise ConfigError(
                f"model {self.name!r}: warmup_runs is {runs!r}; expected an integer >= 0",
                model=self.name,
                key="warmup_runs",
            )
        given = params.get(WARMUP_RUNS_KEY)
        if given is not None:
            try:
                parsed = int(str(given).strip())
            except ValueError:
                parsed = -1
            if parsed < 0 or isinstance(given, bool):
                raise ConfigError(
                    f"model {self.name!r}: parameter {WARMUP_RUNS_KEY} has value {given!r}; expected an integer >= 0",
                    model=self.name,
                    key=WARMUP_RUNS_KEY,
                )
            if runs not in (0, parsed):
                raise ConfigError(
                    f"model {self.name!r}: warmup_runs is {runs} but parameter {WARMUP_RUNS_KEY} is {given!r}; "
                    "give one",
                    model=self.name,
                    key=WARMUP_RUNS_KEY,
                )
            self.warmup_runs = parsed
        elif runs:
            params[WARMUP_RUNS_KEY] = str(runs)
        self._sync_execution_timeout(params)
        self.parameters = params

    def _sync_execution_timeout(self, params: dict[str, Any]) -> None:
        """``EXECUTION_TIMEOUT`` (seconds) and ``execution_timeout`` agree, as WARMUP_RUNS does."""
        given = params.get(EXECUTION_TIMEOUT_KEY)
        if given is None:
            if self.execution_timeout is not None:
                params[EXECUTION_TIMEOUT_KEY] = f"{self.execution_timeout:g}"
            return
        try:
            if isinstance(given, bool):
                raise ValueError(given)
            parsed = check_timeout(float(str(given).strip()), allow_zero=False)
        except ValueError:
            raise ConfigError(
                f"model {self.name!r}: parameter {EXECUTION_TIMEOUT_KEY} has value {given!r}; "
                "expected a positive number of seconds",
                model=self.name,
                key=EXECUTION_TIMEOUT_KEY,
            ) from None
        if self.execution_timeout not in (None, parsed):
            raise ConfigError(
                f"model {self.name!r}: execution_timeout is {self.execution_timeout:g} but parameter "
                f"{EXECUTION_TIMEOUT_KEY} is {given!r}; give one",
                model=self.name,
                key=EXECUTION_TIMEOUT_KEY,
            )
        self.execution_timeout = parsed

    def _check_scheduling(self) -> None:
        """Check dynamic batching, warm-up and version policy against the rest."""
        if self.dynamic_batching is not None:
            if not isinstance(self.dynamic_batching, DynamicBatching):
                raise ConfigError(
                    f"model {self.name!r}: dynamic_batching must be a DynamicBatching or None",
                    model=self.name,
                    key="dynamic_batching",
                )
            self.dynamic_batching.check(self.name, self.max_batch_size)
        if self.sequence_batching is not None:
            if not isinstance(self.sequence_batching, SequenceBatching):
                raise ConfigError(
                    f"model {self.name!r}: sequence_batching must be a SequenceBatching or None",
                    model=self.name,
                    key="sequence_batching",
                )
            if self.dynamic_batching is not None:
                raise ConfigError(
                    f"model {self.name!r}: dynamic_batching and sequence_batching are both given; a model has one "
                    "scheduler (sequence_batching batches too: see docs/sequences.md)",
                    model=self.name,
                    key="sequence_batching",
                )
            self.sequence_batching.check(
                self.name, self.max_batch_size, [s.name for s in self.inputs], [s.name for s in self.outputs]
            )
        self.warmup = tuple(self.warmup)
        for sample in self.warmup:
            if not isinstance(sample, ModelWarmup):
                raise ConfigError(
                    f"model {self.name!r}: warmup holds {sample!r}; expected ModelWarmup", model=self.name, key="warmup"
                )
            sample.check(self.name, self.max_batch_size, self.inputs)
        if self.warmup_runs and not self.inputs:
            raise ConfigError(
                f"model {self.name!r}: {WARMUP_RUNS_KEY}={self.warmup_runs} needs declared inputs to build the "
                "warm-up tensors from; declare inputs or use a model_warmup block",
                model=self.name,
                key=WARMUP_RUNS_KEY,
            )
        try:
            declared_warmup(self.inputs, self.warmup_runs)
        except ConfigError as e:
            raise ConfigError(f"model {self.name!r}: {e}", model=self.name, key=e.key) from None
        if not isinstance(self.version_policy, VersionPolicy):
            raise ConfigError(
                f"model {self.name!r}: version_policy must be a VersionPolicy", model=self.name, key="version_policy"
            )

    def _check_devices(self) -> None:
        if isinstance(self.devices, str):
            self.devices = (self.devices,)
        if self.devices is not None:
            self.devices = tuple(str(d).strip().lower() for d in self.devices)
            for d in self.devices:
                if not _DEVICE_RE.match(d):
                    raise ConfigError(
                        f"model {self.name!r}: device {d!r} is not one of 'cpu', 'cuda', 'cuda:N', 'auto'",
                        model=self.name,
                        key="devices",
                    )
            if self.instance_groups:
                raise ConfigError(
                    f"model {self.name!r}: give devices or instance_groups, not both", model=self.name, key="devices"
                )
        self.instance_groups = tuple(self.instance_groups)
        # (KIND_GPU on every GPU counts as one GPU here; placements() checks the real count)
        total = sum(g.count * max(1, len(g.gpus)) for g in self.instance_groups if isinstance(g, InstanceGroup))
        if total > MAX_INSTANCES:
            raise ConfigError(
                f"model {self.name!r}: its instance groups ask for {total} instances; at most {MAX_INSTANCES} "
                "worker processes per model are started",
                model=self.name,
                key="count",
            )

    @property
    def groups(self) -> tuple[InstanceGroup, ...]:
        """The instance groups, whichever way they were given."""
        if self.instance_groups:
            return tuple(self.instance_groups)
        out = []
        for d in self.devices or ("cpu",):
            m = _DEVICE_RE.match(d)
            assert m is not None
            if d == "cpu":
                out.append(InstanceGroup(self.instances, "KIND_CPU"))
            elif d == "auto":
                out.append(InstanceGroup(self.instances, "KIND_AUTO"))
            else:
                gpus = (int(m.group(2)),) if m.group(2) is not None else ()
                out.append(InstanceGroup(self.instances, "KIND_GPU", gpus))
        return tuple(out)

    def placements(self, cuda_devices: int | None = None) -> list[str]:
        """The device of each instance (``"cpu"`` or ``"cuda:N"``), in instance order.

        Args:
            cuda_devices: GPUs on this machine (default: ask torch).

        Raises:
            ConfigError: an instance asks for a GPU this machine does not have.
        """
        n = cuda_device_count() if cuda_devices is None else cuda_devices
        out = [d for g in self.groups for d in g.devices(self.name, n)]
        if len(out) > MAX_INSTANCES:
            raise ConfigError(
                f"model {self.name!r} asks for {len(out)} instances; at most {MAX_INSTANCES} worker processes per "
                "model are started (lower instance_group count, or list fewer GPUs)",
                model=self.name,
                key="count",
            )
        return out

    def placed_by_model(self, cuda_devices: int | None = None) -> list[bool]:
        """Per instance, in :meth:`placements` order: whether it places itself
        (``KIND_MODEL``: its worker loads the model without a device, where the file says).

        Raises:
            ConfigError: as :meth:`placements`.
        """
        n = cuda_device_count() if cuda_devices is None else cuda_devices
        return [g.kind == "KIND_MODEL" for g in self.groups for _ in g.devices(self.name, n)]

    @property
    def model_dir(self) -> Path:
        """The model's directory in a repository: the one above the version directory.

        That is the parent of the nearest directory of ``path`` named ``version``
        (``<model>/<version>/<file>``); for a path not laid out so, the directory
        two levels above the file.
        """
        return self._layout()[0]

    @property
    def model_filename(self) -> str:
        """The model file's path inside its version directory (``default_model_filename``)."""
        return self._layout()[1]

    def _layout(self) -> tuple[Path, str]:
        path = Path(self.path)
        for parent in path.parents:
            if parent.name == str(self.version):
                return parent.parent, path.relative_to(parent).as_posix()
        return path.parent.parent, path.name

    @property
    def warmup_count(self) -> int:
        """Warm-up executions each instance runs before it is ready."""
        return sum(w.runs for w in self.warmup) + self.warmup_runs

    def warmup_samples(self) -> list[ModelWarmup]:
        """Every warm-up sample, in order: the ``warmup`` blocks, then ``WARMUP_RUNS``."""
        extra = declared_warmup(self.inputs, self.warmup_runs)
        return [*self.warmup, *([extra] if extra else [])]

    def warmup_requests(self) -> list[dict[str, WarmupValue]]:
        """The inputs of every warm-up execution, in order (see :func:`warmup_tensors`).

        Files of ``input_data_file`` are read from :attr:`model_dir` ``/warmup/``.

        Raises:
            ConfigError: a warm-up data file is missing or does not fit its input.
        """
        out: list[dict[str, WarmupValue]] = []
        for sample in self.warmup_samples():
            try:
                out += warmup_tensors(sample, self.model_dir, self.max_batch_size)
            except ConfigError as e:
                raise ConfigError(f"model {self.name!r}: {e}", model=self.name, key=e.key) from None
        return out

    def to_pbtxt(self) -> str:
        """This configuration as ``config.pbtxt`` text.

        ``ModelConfig.from_pbtxt(cfg.to_pbtxt())`` equals ``cfg`` for a configuration
        read from a ``config.pbtxt`` (but for ``path`` and ``version``, which are the
        repository's layout: only :attr:`model_filename` is written, as
        ``default_model_filename``). Python-only settings (``env``, timeouts,
        ``max_retries``, ``max_request_bytes``) are not written; ``instances`` and
        ``devices`` are written as the instance groups they stand for.

        Raises:
            ConfigError: something ``config.pbtxt`` cannot hold (an input without
                dims, a complex dtype).
        """
        from .writer import to_pbtxt

        return to_pbtxt(self)

    def check_files(self) -> None:
        """Check that the model file exists.

        Raises:
            ConfigError: it does not.
        """
        if not Path(self.path).is_file():
            raise ConfigError(
                f"model {self.name!r}: no model file at {os.fspath(self.path)!r}", model=self.name, key="path"
            )

    @classmethod
    def from_pbtxt(cls, source: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
        """Read a Triton ``config.pbtxt`` (a path, or its text).

        Args:
            source: the file's path, or the configuration text itself.
            model_dir: the model's directory in a repository (default: the file's
                directory); the model file is looked up in its version directories
                and the highest version that ``version_policy`` serves is taken
                (:func:`load_repository` gives every served version). Text without
                a directory gives ``path`` = the model file's name, ``version`` 1.

        Raises:
            ConfigError: the file does not parse, uses an unsupported field, or no
                version directory holds the model file (names file and line).
        """
        from .pbtxt import load

        return load(source, model_dir)
