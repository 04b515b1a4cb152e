"""A PyTorch 2 model's call, as a :class:`Runner` runs it (worker process).

The AOTInductor and ``torch.export`` loaders both end with a callable and the call
specification it was exported with: ``in_spec`` (a tuple of ``(args, kwargs)``) and
``out_spec``, ``torch.utils._pytree`` tree specs. The loop hands a runner its inputs
flat, in call-spec order (``ARGS[0]``, ``KWARGS[mask]``, see ``pt2names.py``), and takes
its outputs flat; this module does that mapping, checks the configuration's declared
names against the spec once, at load, and holds the batch-size checks the two loaders
share (:func:`check_batch`).

``run`` is the hot path: everything that depends only on the specs (names, the
selection of declared outputs, how to split the flat inputs) is decided here, at load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...config.formats import zip_kind
from . import modelfile, pt2names
from .runner import LoadError, LoadRequest, Output, Runner

__all__ = ["NO_MAX", "check_batch", "describe", "make_runner"]

#: The largest first dimension of an artifact whose batch dimension has no upper bound
#: (``torch.export.Dim`` without ``max``: the range ends at ``int_oo``).
NO_MAX = 2**31 - 1


def make_runner(
    fmt: str,
    call: Callable[..., Any],
    in_spec: Any,
    out_spec: Any,
    req: LoadRequest,
    *,
    batch_range: tuple[int, int] | None,
    notes: Sequence[str] | None = None,
    info: dict[str, Any] | None = None,
    flat: bool = False,
) -> Runner:
    """A runner for ``call``, named and checked by its call specification.

    Args:
        fmt: the format, for ``Runner.format`` ("aoti", "exported", "python").
        call: runs the model as ``call(*args, **kwargs)``; with ``flat``,
            ``call(leaves)`` takes the input leaves and returns the output leaves, as
            a list, both in call-spec order (AOTInductor's ``loader.run``: skips two
            pytree round trips per call).
        in_spec: the call spec's inputs, a tuple of ``(args, kwargs)``.
        out_spec: the call spec's result.
        req: the load request (model name, declared input and output names).
        batch_range: the rows one call accepts, (min, max); None: not known.
        notes: warnings for the user.
        info: what the worker reports of the format.

    Returns:
        A runner whose inputs are the spec's input paths, all tensors; whose outputs
        are the declared outputs, when the configuration names them by path, else
        every output leaf in spec order.

    Raises:
        LoadError: ``in_spec`` is not ``(args, kwargs)``; a declared input or output
            name is not in the spec (the message lists those that are).
    """
    if in_spec.is_leaf() or in_spec.type is not tuple or in_spec.num_children != 2:
        raise LoadError(
            f"model {req.model!r}: the call specification's inputs are {in_spec}; expected a tuple of "
            "(args, kwargs), as torch.export makes it"
        )
    inputs = pt2names.input_paths(in_spec)
    if req.input_names:
        pt2names.resolve(req.input_names, inputs, "input", req.model)
    paths = pt2names.output_paths(out_spec)
    # Ordinal names only (OUTPUT__0, ...) bind by position: the runner returns every
    # leaf and the front picks. Names that are paths pick leaves here, in declared order.
    picked = pt2names.resolve(req.output_names, paths, "output", req.model) if req.output_names else []
    by_path = bool(picked) and not all(pt2names._ORDINAL.match(name) for name in req.output_names)
    select = picked if by_path else None
    outputs = list(req.output_names) if by_path else paths

    take = _output_taker(req.model, paths, select)
    if flat:

        def run(leaves: list[Any]) -> list[Output]:
            return take(call(leaves))

    else:
        split = _input_splitter(in_spec)
        leaves_of = _output_flattener(out_spec)

        def run(leaves: list[Any]) -> list[Output]:
            args, kwargs = split(leaves)
            return take(leaves_of(call(*args, **kwargs)))

    return Runner(
        format=fmt,
        run=run,
        inputs=inputs,
        kinds=["tensor"] * len(inputs),
        outputs=outputs,
        batch_range=batch_range,
        notes=list(notes or ()),
        info=dict(info or {}),
    )


def check_batch(req: LoadRequest, batch_range: tuple[int, int] | None, *, static: bool, artifact: str) -> None:
    """Refuse a ``max_batch_size`` that the artifact's first dimension cannot take.

    Args:
        req: the load request (``max_batch_size``; 0: no batching, nothing to check).
        batch_range: the rows one call accepts, (min, max); None: not known.
        static: the first dimension is fixed at export (``batch_range`` is (N, N)).
        artifact: what the file is, for messages ("package", "program").

    Raises:
        LoadError: batching a static first dimension, or a ``max_batch_size`` over the
            artifact's maximum (names both and the fix).
    """
    if req.max_batch_size <= 0 or batch_range is None:
        return
    low, high = batch_range
    if static:
        raise LoadError(
            f"model {req.model!r}: max_batch_size is {req.max_batch_size}, but the {artifact} was exported with a "
            f"static first dimension {low}; export it with a dynamic batch dimension (torch.export.Dim) to batch "
            "it, or set max_batch_size: 0"
        )
    if req.max_batch_size > high:
        raise LoadError(
            f"model {req.model!r}: max_batch_size is {req.max_batch_size}, but the {artifact} accepts {low} to "
            f"{high} rows per call; set max_batch_size to at most {high}, or export it with "
            f"Dim(..., max={req.max_batch_size}) or more"
        )


def describe(path: str, fmt: str, error: BaseException | None = None) -> str:
    """What a file that the ``fmt`` loader ("aoti", "exported") cannot load is, and
    what to do with it; ``error`` is what loading it raised.

    ``modelfile.describe`` says so for a TorchScript loader; a PT2 loader's user more
    likely handed over the other PT2 format, or the checkpoint the export came from.
    Reads only the file's head or its zip directory.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"it cannot be read ({e})"
    kind = zip_kind(path)
    advice = {
        "aoti": "an AOTInductor package (torch._inductor.aoti_compile_and_package); serve it as format 'aoti' "
        '(platform: "torch_aoti")',
        "exported": "a torch.export program without compiled code (torch.export.save); serve it as format "
        "'exported', or compile it with torch._inductor.aoti_compile_and_package",
        "torchscript": "a TorchScript archive; serve it as format 'torchscript' (platform: \"pytorch_libtorch\")",
        "checkpoint": "a torch.save checkpoint (a state dict or a pickled module), not a PT2 archive; export the "
        "model with torch.export, or serve its nn.Module as a model.py with the state dict as model.pt "
        "(format 'python')",
    }
    why = f" ({error})" if error is not None else ""
    if kind == fmt:
        return f"it looks like one, but is truncated or corrupt{why}"
    if kind is None and head[:2] == b"PK":
        return f"it starts like a zip file, but is not a PT2 archive, or is truncated or corrupt{why}"
    if kind is not None:
        return f"it is {advice[kind]}"
    if head[:1] == b"\x80":
        return f"it is {modelfile.describe(path)}"
    return f"it is not a zip file (it starts with {head!r})"


def _input_splitter(in_spec: Any) -> Callable[[list[Any]], tuple[tuple[Any, ...], dict[str, Any]]]:
    """Flat inputs -> ``(args, kwargs)``: by slicing when every argument is a leaf
    (nearly every model; a pytree unflatten costs microseconds per call), else by the
    spec."""
    args_spec, kwargs_spec = in_spec.children()
    n_args = args_spec.num_children
    keys = list(kwargs_spec.context or ()) if kwargs_spec.type is dict else None
    flat_args = args_spec.type is tuple and all(c.is_leaf() for c in args_spec.children())
    flat_kwargs = keys is not None and all(c.is_leaf() for c in kwargs_spec.children())
    if flat_args and flat_kwargs:
        assert keys is not None
        if not keys:
            return lambda leaves: (tuple(leaves), {})
        return lambda leaves: (tuple(leaves[:n_args]), dict(zip(keys, leaves[n_args:])))
    unflatten = in_spec.unflatten
    return lambda leaves: unflatten(leaves)


def _output_flattener(out_spec: Any) -> Callable[[Any], list[Any]]:
    """A result -> its leaves, in spec order (one tensor: no pytree walk)."""
    from torch.utils._pytree import tree_leaves

    if out_spec.is_leaf():
        return lambda result: [result]
    return tree_leaves


def _output_taker(model: str, paths: list[str], select: list[int] | None) -> Callable[[list[Any]], list[Output]]:
    """Output leaves -> the runner's outputs: every leaf, or the selected ones; each
    checked to be a tensor (the wire carries tensors, and a PT2 model has no strings)."""
    import torch

    tensor = torch.Tensor
    count = len(paths)

    def take(leaves: list[Any]) -> list[Output]:
        if len(leaves) != count:
            raise TypeError(
                f"model {model!r} returned {len(leaves)} output leaves; its call specification has {count}: {paths}"
            )
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, tensor):
                raise TypeError(f"model {model!r}: output {paths[i]} is a {type(leaf).__name__}; expected a Tensor")
        if select is None:
            return leaves
        return [leaves[i] for i in select]

    return take
