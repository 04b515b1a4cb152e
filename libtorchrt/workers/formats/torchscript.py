"""TorchScript models (``torch.jit.save`` archives): the loader (worker process).

The method's schema gives the inputs' names and kinds: ``Tensor`` arguments take
tensors, ``List[str]`` arguments take strings, and a method that takes one
``Dict[str, Tensor]`` is called with the request's keys and tensors as that dictionary
(the loop assembles it: ``Runner.dict_input``). A method returning one ``List[str]``
returns strings; otherwise a tensor, or a tuple/list of tensors and string lists.
``FREEZE_MODULE`` / ``OPTIMIZE_FOR_INFERENCE`` are applied here (``workers/flags.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

from ...transport import tensors as tensor_io
from .. import flags as flag_mod
from . import modelfile
from .runner import LoadRequest, Output, Runner

__all__ = ["load"]

_KINDS = {"Tensor": "tensor", "Optional[Tensor]": "tensor", "List[str]": "strings", "Optional[List[str]]": "strings"}


def load(req: LoadRequest) -> Runner:
    """Load, freeze/optimize as flagged, and describe a TorchScript module.

    Raises:
        RuntimeError: torch cannot load the file (saying what the file is, if it is
            recognisably something else: a checkpoint, a PT2 file).
        ConfigError: freezing or optimizing failed (names the flag).
    """
    import torch

    with warnings.catch_warnings():
        # torch.jit is deprecated in this torch; we call it on purpose (TorchScript models).
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        try:
            # A KIND_MODEL instance places itself: its tensors stay where the file says.
            module = torch.jit.load(req.path, map_location=None if req.placed_by_model else req.device)
        except RuntimeError as e:
            what = modelfile.describe(req.path)
            if what is None:
                raise
            raise RuntimeError(f"{req.path} is {what}") from e
    module.eval()
    if req.on_weights is not None:  # before freezing turns the weights into constants
        req.on_weights(module)
    module = flag_mod.prepare(module, req.flags, method=req.method, model=req.model)
    method = getattr(module, req.method)
    schema = method.schema
    types = [str(a.type) for a in schema.arguments[1:]]  # drop self
    returns = [str(r.type) for r in schema.returns]
    strings_out = returns == ["List[str]"]

    def run(inputs: list[Any]) -> list[Output]:
        return _outputs(method(*inputs), strings_out)

    return Runner(
        format="torchscript",
        run=run,
        inputs=[a.name for a in schema.arguments[1:]],
        kinds=[_KINDS.get(t) for t in types],
        dict_input=types == ["Dict[str, Tensor]"],
    )


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _outputs(result: Any, strings_out: bool = False) -> list[Output]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if strings_out:  # one List[str]; the schema tells it from an empty list of tensors
        return [tensor_io.Strings.of(result)]
    if isinstance(result, (tuple, list)):
        out: list[Output] = []
        for item in result:
            if isinstance(item, torch.Tensor):
                out.append(item)
            elif _is_strings(item):
                out.append(tensor_io.Strings.of(item))
            else:
                break
        else:
            return out
    raise TypeError(
        f"the model returned {type(result).__name__}; expected a Tensor, a List[str], or a tuple/list of them"
    )
