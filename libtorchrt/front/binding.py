"""Binding a request's inputs to the model's arguments, and naming its outputs (front).

Runs in the caller's thread, before anything is copied: a request that does not fit
the model fails here with :class:`InvalidInputError` and no worker ever sees it.

Inputs bind as in Triton's PyTorch backend: a key equal to a ``forward()`` argument
name binds to it; a key ``<anything>__<i>`` binds to argument ``i``; a list binds by
position. A method that takes one ``Dict[str, Tensor]`` gets the request's inputs as that
dictionary, keyed by their names (the declared inputs' names, if any are declared).
Outputs are named by the configured outputs (by their ``__<i>`` suffix, else in order)
and default to ``OUTPUT__<i>``.

A ``TYPE_STRING`` input (TorchScript's ``List[str]``) takes a list or tuple of ``str``
(or of UTF-8 ``bytes``), or a numpy array of str, bytes or such objects, and binds to
:class:`~libtorchrt.transport.tensors.Strings`, encoded here once. An input that is not
declared binds to strings when it is given as such.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..config.model import ModelConfig, TensorSpec
from ..errors import InvalidInputError
from ..transport.dtypes import DTYPES
from ..transport.tensors import Strings
from ..transport.values import describe, is_stringlike
from ..transport.wire import MAX_DIMS, MAX_SIZE
from ..workers.sequences import place

__all__ = ["Binder"]

_INDEXED = re.compile(r"^.+__(\d+)$")
_WIRE_DTYPES = frozenset(DTYPES.values())
_STRINGS = "a list of str (TYPE_STRING)"
#: distinct key sets of a Dict[str, Tensor] model whose encoding is kept
_MAX_KEY_SETS = 64
#: distinct (input, dtype, shape) kept as already checked
_MAX_ACCEPTED = 256


def _index(name: str) -> int | None:
    m = _INDEXED.match(name)
    return int(m.group(1)) if m else None


def output_positions(outputs: Sequence[TensorSpec]) -> list[tuple[int, TensorSpec]]:
    """Which of a model's results each declared output is: the ``<i>`` of names all
    spelled ``OUTPUT__<i>`` (Triton's PyTorch convention), else their order."""
    indexed = [_index(s.name) for s in outputs]
    if indexed and all(i is not None for i in indexed):
        return [(i, s) for i, s in zip(indexed, outputs) if i is not None]
    return list(enumerate(outputs))


def _named(paths: Sequence[str]) -> bool:
    """Call-spec paths that name more than positions: not just ``RESULT`` (one tensor)
    or ``RESULT[0]``, ``RESULT[1]``... (a tuple), which are called ``OUTPUT__<i>``."""
    flat = {"RESULT"} | {f"RESULT[{i}]" for i in range(len(paths))}
    return any(p not in flat for p in paths)


class Binder:
    """Binds requests for one model; built once, when its first worker is READY.

    Args:
        cfg: the model's configuration.
        arg_names: the model method's argument names (without ``self``).
        dict_input: the method takes one ``Dict[str, Tensor]`` (``wire.Ready.dict_input``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        arg_names: Sequence[str],
        *,
        dict_input: bool = False,
        output_names: Sequence[str] = (),
    ) -> None:
        self.model = cfg.name
        seq = cfg.sequence_batching
        #: the inputs a sequence batcher fills in (control and state inputs): the
        #: arguments they go to are not the caller's, and are left out here
        self.hidden = set(seq.hidden_inputs) if seq is not None and not dict_input else set()
        placed = place(arg_names, self._names(cfg, self.hidden))
        hidden_at = {pos for name, pos in placed.items() if name in self.hidden}
        #: argument positions the caller's inputs bind to (all of them but the hidden)
        visible = [i for i in range(len(arg_names)) if i not in hidden_at]
        #: an ``__<i>`` suffix names the i-th argument of the method, hidden ones counted
        self._suffix: dict[int, int] = {full: i for i, full in enumerate(visible)}
        arg_names = [arg_names[i] for i in visible]
        self.arg_names = list(arg_names)
        self.max_batch_size = cfg.max_batch_size
        self.dict_input = dict_input
        #: the declared inputs by name (a Dict[str, Tensor] model's keys)
        self.declared: dict[str, TensorSpec] = {spec.name: spec for spec in cfg.inputs}
        # Resolved once: TensorSpec.torch_dtype raises for TYPE_STRING, which has none.
        self._dtypes: dict[str, torch.dtype] = {s.name: s.torch_dtype for s in cfg.inputs if not s.is_string}
        self._keys: dict[tuple[str, ...], Strings] = {}
        n = len(self.arg_names)
        self.positions: dict[str, int] = {name: i for i, name in enumerate(self.arg_names)}
        self.specs: list[TensorSpec | None] = [None] * n
        # Triton's precedence: argument name, then the `__<i>` suffix, then the
        # configuration's order, into the positions that no other spec claimed.
        unplaced: list[TensorSpec] = []
        for spec in cfg.inputs if not dict_input else ():
            pos = self.positions.get(spec.name)
            if pos is None:
                pos = self._at(_index(spec.name))
            if pos is None or pos >= n or self.specs[pos] is not None:
                unplaced.append(spec)
                continue
            self.positions[spec.name] = pos
            self.specs[pos] = spec
        free = [i for i in range(n) if self.specs[i] is None]
        for spec, pos in zip(unplaced, free):
            self.positions[spec.name] = pos
            self.specs[pos] = spec
        self._outputs = list(cfg.outputs)
        #: the outputs' names as the model gives them (a PT2 call spec's), used when
        #: none are declared and they say more than positions ("RESULT[logits]")
        self._model_outputs = list(output_names) if _named(output_names) else []
        #: outputs declared with a reshape (given their dims back: shape_outputs)
        self._reshaped = [s for s in self._outputs if s.reshape is not None]
        self._output_names: dict[int, list[str]] = {}
        #: (position, dtype, shape) of CPU/CUDA dense tensors that passed every check
        #: (see _accepted_tensor); a bounded memory of the shapes a model is sent
        self._accepted: set[tuple[int, torch.dtype, torch.Size]] = set()

    @staticmethod
    def _names(cfg: ModelConfig, hidden: set[str]) -> list[str]:
        """The names placed among the arguments: the declared inputs, then the hidden."""
        seq = cfg.sequence_batching
        return [s.name for s in cfg.inputs] + ([n for n in seq.hidden_inputs if n in hidden] if seq else [])

    def _at(self, index: int | None) -> int | None:
        """The caller's position of the method's ``index``-th argument (None: hidden)."""
        return None if index is None else self._suffix.get(index)

    def position(self, key: str) -> int | None:
        """The position of the input a request names ``key`` (its declared or argument
        name, or ``INPUT__<i>``), as :meth:`bind` finds it; None: no input of the caller's."""
        pos = self.positions.get(key)
        if pos is None and key not in self.hidden:
            pos = self._at(_index(key))
        return pos

    @property
    def expected(self) -> str:
        if self.dict_input:
            names = list(self.declared) if self.declared else "named by the request"
            return f"a dict of input name -> tensor (the model takes one Dict[str, Tensor]): inputs {names}"
        return f"inputs {[self.display(i) for i in range(len(self.arg_names))]}"

    def display(self, pos: int) -> str:
        spec = self.specs[pos]
        return spec.name if spec is not None else self.arg_names[pos]

    def bind(self, inputs: Any) -> list[Any]:
        """Return the request's values in argument order, checked: tensors, and
        :class:`Strings` for string inputs. For a ``Dict[str, Tensor]`` model, the
        dictionary's values, then its keys (as :class:`Strings`), last.

        Raises:
            InvalidInputError: an input is unknown, missing, not a tensor (not strings,
                for a string input), or of the wrong dtype, rank or size.
        """
        if self.dict_input:
            return self._bind_dict(inputs)
        n = len(self.arg_names)
        if n == 1 and type(inputs) is torch.Tensor and self._accepted_tensor(0, inputs):
            return [inputs]  # the common case, seen before: nothing to check again
        if type(inputs) is dict and len(inputs) == n:
            named = self._by_name(inputs)
            if named is not None:
                return named  # (the other common case)
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            inputs = [inputs]
        elif n == 1 and isinstance(inputs, (list, tuple)) and inputs and is_stringlike(inputs):
            inputs = [inputs]  # the strings of a one-argument model
        if isinstance(inputs, Mapping):
            bound: list[Any] = [None] * n
            for key, value in inputs.items():
                if isinstance(key, str) and key in self.hidden and key not in self.positions:
                    raise InvalidInputError(
                        self.model, key, self.expected, f"{key!r}, which the sequence batcher fills in"
                    )
                pos = self.position(key) if isinstance(key, str) else None
                if pos is None or pos >= n:
                    raise InvalidInputError(self.model, str(key), self.expected, f"unknown input {key!r}")
                if bound[pos] is not None:
                    raise InvalidInputError(
                        self.model, str(key), "each input once", f"{key!r} binds to an input already given"
                    )
                bound[pos] = value
            missing = [self.display(i) for i, v in enumerate(bound) if v is None]
            if missing:
                raise InvalidInputError(self.model, missing[0], self.expected, f"no value for {missing}")
        elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
            bound = list(inputs)
            if len(bound) != n:
                raise InvalidInputError(self.model, None, f"{n} {self.expected}", f"{len(bound)} positional inputs")
        else:
            raise InvalidInputError(
                self.model, None, "a dict of name -> tensor, or a list of tensors", type(inputs).__name__
            )
        return [
            v if type(v) is torch.Tensor and self._accepted_tensor(i, v) else self._check_at(i, v)
            for i, v in enumerate(bound)
        ]

    def _by_name(self, inputs: dict[Any, Any]) -> list[Any] | None:
        """``inputs`` in argument order if each names an argument once and is a tensor
        of a dtype and shape accepted there before; None: anything else, which the
        general path checks (and refuses with the reason)."""
        bound: list[Any] = [None] * len(self.arg_names)
        positions = self.positions
        for key, value in inputs.items():
            pos = positions.get(key)
            if pos is None or bound[pos] is not None or type(value) is not torch.Tensor:
                return None
            if not self._accepted_tensor(pos, value):
                return None
            bound[pos] = value
        return bound

    def _accepted_tensor(self, pos: int, value: torch.Tensor) -> bool:
        """Whether a tensor of this dtype and shape passed every check at ``pos``
        already, on the CPU or a GPU, dense (each of those a cheap attribute)."""
        return (
            (pos, value.dtype, value.shape) in self._accepted
            and value.layout == torch.strided
            and (value.is_cpu or value.is_cuda)
        )

    def _check_at(self, pos: int, value: Any) -> Any:
        spec = self.specs[pos]
        checked = self._check(self.display(pos), spec, value)
        if (
            type(value) is torch.Tensor
            and checked is value  # (not reshaped)
            and not (spec is not None and spec.is_string)
        ):
            if len(self._accepted) >= _MAX_ACCEPTED:
                self._accepted.clear()
            self._accepted.add((pos, value.dtype, value.shape))
        return checked

    def _bind_dict(self, inputs: Any) -> list[Any]:
        if not isinstance(inputs, Mapping):
            raise InvalidInputError(self.model, None, self.expected, type(inputs).__name__)
        values = []
        for key, value in inputs.items():
            spec = self.declared.get(key) if isinstance(key, str) else None
            if spec is None and (self.declared or not isinstance(key, str)):
                raise InvalidInputError(self.model, str(key), self.expected, f"unknown input {key!r}")
            if spec is not None and spec.is_string:
                raise InvalidInputError(
                    self.model, key, "a tensor: the model takes one Dict[str, Tensor]", "an input declared TYPE_STRING"
                )
            values.append(self._check(key, spec, value, strings=False))
        missing = [name for name, spec in self.declared.items() if name not in inputs and not spec.optional]
        if missing:
            raise InvalidInputError(self.model, missing[0], self.expected, f"no value for {missing}")
        keys = tuple(inputs)
        encoded = self._keys.get(keys)
        if encoded is None:
            if len(self._keys) >= _MAX_KEY_SETS:  # undeclared models may see any key sets
                self._keys.clear()
            try:
                encoded = self._keys[keys] = Strings.of(keys)
            except UnicodeEncodeError:
                raise InvalidInputError(self.model, None, "input names in valid Unicode", repr(keys)) from None
        return [*values, encoded]

    def _check(self, name: str, spec: TensorSpec | None, value: Any, strings: bool = True) -> Any:
        if spec is not None and spec.is_string:
            return self._strings(name, spec, value)
        if spec is None and strings and is_stringlike(value):
            return self._strings(name, None, value)
        if isinstance(value, np.ndarray):
            try:
                value = torch.from_numpy(value)
            except TypeError:
                raise InvalidInputError(
                    self.model, name, "a tensor of a supported dtype", f"numpy {value.dtype}"
                ) from None
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(self.model, name, "a torch.Tensor", describe(value))
        if value.device.type not in ("cpu", "cuda"):
            raise InvalidInputError(self.model, name, "a CPU or CUDA tensor", describe(value))
        if value.dtype not in _WIRE_DTYPES or value.layout != torch.strided or value.is_quantized:
            raise InvalidInputError(self.model, name, "a dense tensor of a supported dtype", describe(value))
        if value.dim() > MAX_DIMS or (not value.numel() and max(value.shape, default=0) >= MAX_SIZE):
            # (the worker would refuse its descriptor; an empty tensor's sizes are free)
            raise InvalidInputError(
                self.model, name, f"at most {MAX_DIMS} dims, each under 2**40", f"shape {list(value.shape)}"
            )
        if spec is not None:
            if value.dtype != self._dtypes[spec.name]:
                raise InvalidInputError(
                    self.model, name, f"dtype {spec.dtype}", f"dtype {str(value.dtype).removeprefix('torch.')}"
                )
            if spec.dims is not None:
                shape = tuple(value.shape)
                self._check_shape(name, spec, shape)
                if spec.reshape is not None:  # Triton's reshape: the shape the model takes
                    value = value.reshape(spec.model_shape(shape, self.max_batch_size > 0))
        return value

    def _strings(self, name: str, spec: TensorSpec | None, value: Any) -> Strings:
        """Check and encode a string input (see the module docstring)."""
        items: Sequence[Any]
        shape: tuple[int, ...] | None = None
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "USO":
                raise InvalidInputError(self.model, name, _STRINGS, describe(value))
            if value.ndim != 1:
                shape = tuple(value.shape)
                if spec is not None and spec.dims is not None:
                    self._check_shape(name, spec, shape)
                spec = None  # checked: its count follows
            items = value.reshape(-1).tolist()
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            raise InvalidInputError(self.model, name, _STRINGS, describe(value))
        encoded = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                try:
                    encoded.append(item.encode())
                except UnicodeEncodeError as e:
                    raise InvalidInputError(
                        self.model, name, "strings encodable as UTF-8", f"element {i}: {e.reason}"
                    ) from None
            elif isinstance(item, (bytes, bytearray)):
                try:
                    item.decode()  # the model gets str: the bytes must be UTF-8
                except UnicodeDecodeError as e:
                    raise InvalidInputError(
                        self.model, name, "str, or bytes in UTF-8", f"element {i}: {e.reason} at byte {e.start}"
                    ) from None
                encoded.append(bytes(item))
            else:
                raise InvalidInputError(self.model, name, _STRINGS, f"element {i} is {describe(item)}")
        if spec is not None and spec.dims is not None:
            shape = self._check_count(name, spec, len(encoded))
        try:
            return Strings(encoded, shape)
        except ValueError as e:
            raise InvalidInputError(self.model, name, "strings under 4 GiB each", str(e)) from None

    def _check_count(self, name: str, spec: TensorSpec, count: int) -> tuple[int, ...] | None:
        """A flat list of strings holds the elements of ``dims`` (rows of them, when the
        model batches) in row-major order: check that ``count`` is such a number.

        Returns:
            The request's shape when ``dims`` tell it (no -1), else None (1-D).
        """
        dims = tuple(spec.dims or ())
        per_row = math.prod(d for d in dims if d != -1)
        batched = self.max_batch_size > 0
        if -1 not in dims and not batched:
            if count != per_row:
                raise InvalidInputError(self.model, name, f"{per_row} strings (dims {list(dims)})", f"{count} strings")
            return dims
        if count % per_row if per_row else count:
            raise InvalidInputError(
                self.model, name, f"a multiple of {per_row} strings (dims {list(dims)})", f"{count} strings"
            )
        rows = count // per_row if per_row else 0
        if not batched or -1 in dims:
            return None
        if rows > self.max_batch_size:
            raise InvalidInputError(
                self.model, name, f"at most max_batch_size={self.max_batch_size} rows", f"{rows} rows"
            )
        return (rows, *dims)

    def _check_shape(self, name: str, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        dims = tuple(spec.dims or ())
        if self.max_batch_size > 0:
            dims = (-1, *dims)
        ok = len(shape) == len(dims) and all(d == -1 or d == s for d, s in zip(dims, shape))
        if ok and self.max_batch_size > 0 and shape[0] > self.max_batch_size:
            raise InvalidInputError(
                self.model, name, f"at most max_batch_size={self.max_batch_size} rows", f"{shape[0]} rows"
            )
        if not ok:
            raise InvalidInputError(self.model, name, f"shape {list(dims)} (-1: any size)", f"shape {list(shape)}")

    @property
    def reshapes(self) -> bool:
        return bool(self._reshaped)

    def shape_outputs(self, result: dict[str, Any]) -> dict[str, Any]:
        """Give outputs declared with ``reshape`` their declared ``dims`` back (the model
        produces the ``reshape`` shape; the caller gets ``dims``, as in Triton)."""
        for spec in self._reshaped:
            value = result.get(spec.name)
            if isinstance(value, torch.Tensor) and spec.dims is not None and list(spec.dims).count(-1) <= 1:
                lead = tuple(value.shape[:1]) if self.max_batch_size > 0 and value.dim() else ()
                try:
                    result[spec.name] = value.reshape(lead + tuple(spec.dims))
                except RuntimeError:
                    pass  # not that many elements: hand it over as the model made it
        return result

    def output_names(self, count: int) -> list[str]:
        """Names for a result of ``count`` tensors (cached per count)."""
        names = self._output_names.get(count)
        if names is None:
            names = [f"OUTPUT__{i}" for i in range(count)]
            if not self._outputs and len(self._model_outputs) == count:
                names = list(self._model_outputs)
            for i, spec in output_positions(self._outputs):
                if i < count:
                    names[i] = spec.name
            self._output_names[count] = names
        return names
