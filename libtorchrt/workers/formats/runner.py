"""What a loaded model is to the worker's loop, whatever its format (worker process).

Every loader (``torchscript.py``, ``aoti.py``, ``exported.py``, ``python.py``) turns a
model file into a :class:`Runner`: a function from the request's inputs, flat and in
``inputs`` order, to the model's outputs, flat, plus what the front needs to bind
requests to it (the inputs' names, the outputs' names, the rows one call may take).
The loop (``worker.py``) knows nothing of formats.

PyTorch 2 models name their inputs and outputs by their call specification, as
Triton's PyTorch backend does for PT2: ``ARGS[i]``, ``KWARGS[key]``, nested
``ARGS[2][key]``; ``RESULT``, ``RESULT[key]``, ``RESULT[i][key]`` (see ``pt2names.py``).
The ordinal names ``INPUT__<i>`` / ``OUTPUT__<i>`` bind to the i-th of those leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config.flags import Flags

__all__ = ["LoadError", "LoadRequest", "Output", "Runner"]

#: One output of a model: a tensor, or strings (a ``List[str]``).
Output = Any  # torch.Tensor | tensor_io.Strings


class LoadError(Exception):
    """The model file cannot be served as configured; the message says why and what to do.

    Raised by a loader at start-up (a start failure, reported to the front by the
    worker's FAILED message with this type's name).
    """


@dataclass
class LoadRequest:
    """What a loader is given (from the worker's spec)."""

    #: the model file
    path: str
    #: the model's name, for messages
    model: str
    #: "cpu" or "cuda:N": where this instance runs
    device: str
    #: the method to run (TorchScript's MODULE_METHOD_NAME; a model.py's nn.Module method)
    method: str
    #: the parsed execution-mode flags
    flags: Flags
    #: the raw parameters (TORCH_COMPILE_OPTIONAL_PARAMETERS and the like)
    parameters: Mapping[str, str]
    #: the model's max_batch_size (0: no batch dimension)
    max_batch_size: int = 0
    #: the declared inputs' and outputs' names (checked against a PT2 call spec)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    #: called with the loaded module (``nn.Module`` or ``ScriptModule``) once its weights
    #: are loaded, before it is frozen or compiled: where the worker shares them
    #: (``workers/weights.py``); a format without a module to share says so in a note
    on_weights: Callable[[Any], None] | None = None
    #: a KIND_MODEL instance: load the model where its file says (no ``map_location``);
    #: ``device`` is "cpu" (where its inputs arrive), and its outputs are brought back there
    placed_by_model: bool = False


@dataclass
class Runner:
    """A loaded model, as the loop runs it."""

    #: "torchscript", "aoti", "exported" or "python"
    format: str
    #: flat inputs (in ``inputs`` order) -> flat outputs (in ``outputs`` order, if named)
    run: Callable[[list[Any]], list[Output]]
    #: the inputs' names in call order: what requests bind to (argument names, or PT2
    #: call-spec paths such as "ARGS[0]", "KWARGS[mask]")
    inputs: list[str]
    #: per input: "tensor", "strings", or None (not checked by the loop)
    kinds: list[str | None]
    #: the outputs' names in order ("RESULT[logits]"); empty: unnamed, the front calls
    #: them OUTPUT__<i> (or by the declared outputs)
    outputs: list[str] = field(default_factory=list)
    #: the method takes one Dict[str, Tensor] (TorchScript): requests carry keys last
    dict_input: bool = False
    #: rows (dim 0) one call accepts, (min, max), read from the artifact; None: any
    batch_range: tuple[int, int] | None = None
    #: warnings for the user (reported in READY)
    notes: list[str] = field(default_factory=list)
    #: what the worker reports of its format (e.g. the compile cache it used)
    info: dict[str, Any] = field(default_factory=dict)
