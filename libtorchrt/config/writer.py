"""Writing a :class:`ModelConfig` as ``config.pbtxt`` text (runs wherever it is called).

The configuration is turned into the protobuf message of ``model_config.proto`` and
printed by protobuf's ``text_format``, so the text is what Triton would read too. What
only a Python configuration can say (``env``, timeouts, retries) is not written; the
model file's location is the repository's layout, so only its name is written
(``default_model_filename``).
"""

from __future__ import annotations

from google.protobuf import text_format

from ..errors import ConfigError
from . import model_config_pb2 as pb
from .batching import DynamicBatching, QueuePolicy
from .model import ModelConfig
from .sequences import SequenceBatching
from .tensor import TensorSpec, triton_dtype
from .warmup import ModelWarmup

__all__ = ["to_message", "to_pbtxt"]

_HEADER = "# written by libtorchrt (ModelConfig.to_pbtxt)\n"


def to_pbtxt(cfg: ModelConfig) -> str:
    """``config.pbtxt`` text for ``cfg`` (see :meth:`ModelConfig.to_pbtxt`).

    Raises:
        ConfigError: something ``config.pbtxt`` cannot hold.
    """
    return _HEADER + text_format.MessageToString(to_message(cfg), as_utf8=True)


def to_message(cfg: ModelConfig) -> pb.ModelConfig:
    """The protobuf message for ``cfg``.

    Raises:
        ConfigError: an input or output without dims, or with a dtype Triton lacks.
    """
    msg = pb.ModelConfig(name=cfg.name, max_batch_size=cfg.max_batch_size)
    if cfg.format == "python":  # Triton's Python-based PyTorch runtime
        msg.backend, msg.runtime = "pytorch", "model.py"
    else:
        msg.platform = "torch_aoti" if cfg.format == "aoti" else "pytorch_libtorch"
    policy = cfg.version_policy
    if policy.kind == "all":
        msg.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        msg.version_policy.specific.versions.extend(policy.versions)
    elif policy.num_versions != 1:  # latest 1 is the default: leave it out
        msg.version_policy.latest.num_versions = policy.num_versions
    for spec in cfg.inputs:
        _tensor(cfg, spec, msg.input.add(), "input")
    for spec in cfg.outputs:
        _tensor(cfg, spec, msg.output.add(), "output")
    for group in cfg.groups:
        msg.instance_group.add(
            name=group.name, count=group.count, kind=pb.ModelInstanceGroup.Kind.Value(group.kind), gpus=group.gpus
        )
    if cfg.dynamic_batching is not None:
        _batching(cfg.dynamic_batching, msg.dynamic_batching)
    if cfg.sequence_batching is not None:
        _sequences(cfg.sequence_batching, msg.sequence_batching)
    for sample in cfg.warmup:
        _warmup(sample, msg.model_warmup.add())
    for key, value in cfg.parameters.items():
        msg.parameters[key].string_value = str(value)
    msg.default_model_filename = cfg.model_filename
    return msg


def _tensor(cfg: ModelConfig, spec: TensorSpec, out: pb.ModelInput | pb.ModelOutput, kind: str) -> None:
    if spec.dims is None:
        raise ConfigError(
            f"model {cfg.name!r}: {kind} {spec.name!r} has no dims; config.pbtxt needs them (-1 for any size)",
            model=cfg.name,
            key="dims",
        )
    out.name = spec.name
    try:
        out.data_type = pb.DataType.Value(triton_dtype(str(spec.dtype)))
    except ConfigError as e:
        raise ConfigError(f"model {cfg.name!r}: {kind} {spec.name!r}: {e}", model=cfg.name, key="data_type") from None
    out.dims.extend(spec.dims)
    if spec.reshape is not None:
        out.reshape.SetInParent()  # reshape { } (a scalar) differs from no reshape
        out.reshape.shape.extend(spec.reshape)
    if spec.optional and isinstance(out, pb.ModelInput):
        out.optional = True
    if spec.label_filename is not None and isinstance(out, pb.ModelOutput):
        out.label_filename = spec.label_filename


def _policy(policy: QueuePolicy, out: pb.ModelQueuePolicy) -> None:
    out.timeout_action = pb.ModelQueuePolicy.TimeoutAction.Value(policy.timeout_action)
    out.default_timeout_microseconds = policy.default_timeout_microseconds
    out.allow_timeout_override = policy.allow_timeout_override
    out.max_queue_size = policy.max_queue_size


def _sequences(seq: SequenceBatching, out: pb.ModelSequenceBatching) -> None:
    out.max_sequence_idle_microseconds = seq.max_sequence_idle_microseconds
    for c in seq.control_inputs:
        control = out.control_input.add(name=c.name).control.add()
        control.kind = pb.ModelSequenceBatching.Control.Kind.Value(c.kind)
        if c.is_corrid:
            name = c.data_type.upper() if c.data_type.startswith("uint") else triton_dtype(c.data_type)
            control.data_type = pb.DataType.Value(name if name.startswith("TYPE_") else f"TYPE_{name}")
        elif c.data_type == "int32":
            control.int32_false_true.extend(int(v) for v in c.false_true)
        elif c.data_type == "float32":
            control.fp32_false_true.extend(float(v) for v in c.false_true)
        else:
            control.bool_false_true.extend(bool(v) for v in c.false_true)
    for st in seq.states:
        state = out.state.add(
            input_name=st.input_name,
            output_name=st.output_name,
            data_type=pb.DataType.Value(triton_dtype(st.data_type)),
            dims=list(st.dims),
            use_same_buffer_for_input_output=st.use_same_buffer_for_input_output,
            use_growable_memory=st.use_growable_memory,
        )
        if st.initial is None:
            continue  # (zeros of dims, as no initial_state means)
        initial = state.initial_state.add(
            data_type=state.data_type, dims=list(st.start_shape), name=f"{st.input_name}_initial"
        )
        if st.data_file is None:
            initial.zero_data = True
        else:
            initial.data_file = st.data_file
    if seq.strategy == "oldest":
        out.oldest.max_candidate_sequences = seq.max_candidate_sequences
        out.oldest.preferred_batch_size.extend(seq.preferred_batch_size)
        out.oldest.max_queue_delay_microseconds = seq.max_queue_delay_microseconds
        out.oldest.preserve_ordering = seq.preserve_ordering
    else:
        out.direct.max_queue_delay_microseconds = seq.max_queue_delay_microseconds
        out.direct.minimum_slot_utilization = seq.minimum_slot_utilization


def _batching(batching: DynamicBatching, out: pb.ModelDynamicBatching) -> None:
    out.SetInParent()  # dynamic_batching { } alone turns the batcher on
    out.preferred_batch_size.extend(batching.preferred_batch_size)
    out.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
    out.preserve_ordering = batching.preserve_ordering
    out.priority_levels = batching.priority_levels
    out.default_priority_level = batching.default_priority_level
    if batching.default_queue_policy != QueuePolicy():
        _policy(batching.default_queue_policy, out.default_queue_policy)
    for level, policy in sorted(batching.priority_queue_policy.items()):
        _policy(policy, out.priority_queue_policy[level])


def _warmup(sample: ModelWarmup, out: pb.ModelWarmup) -> None:
    out.name = sample.name
    out.batch_size = sample.batch_size
    out.count = sample.count
    for name, value in sample.inputs.items():
        entry = out.inputs[name]
        entry.data_type = pb.DataType.Value(triton_dtype(str(value.data_type)))
        entry.dims.extend(value.dims)
        if value.input_data_file is not None:
            entry.input_data_file = value.input_data_file
        elif value.random_data:
            entry.random_data = True
        else:
            entry.zero_data = True
