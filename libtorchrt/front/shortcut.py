"""The admission of a request like one admitted before (front, the caller's thread:
an event loop's, or any thread calling ``Pool.infer``).

Every request passes :meth:`Admission.take`: the model looked up, its inputs bound and
checked, their bytes placed, a :class:`Call` made, its queue asked. For the callers of a
model that the hub batches, that was most of the front's work per request, paid holding
the GIL (docs/measurements/shortcut.md). Yet those callers send the same request again
and again: one input, of the dtype and non-batch shape the model accepted last time.

So once the full path has admitted such a request, :class:`Shortcut` remembers what it
found out (the input's name, dtype and non-batch dimensions, the bytes a row, the batch
key, the queue's level and limits), and a later request that matches it exactly and asks
for nothing else (no version, priority or sequence; no timeout, or a plain number of
seconds in range) is admitted by comparing a few attributes. It gets the same call, with the
same fields, that the full path would make. A request that differs in any way, or that
the full path would refuse, goes the full way, which says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..deadlines import MAX_TIMEOUT_S
from ..transport import tensors as tensor_io
from ..transport import wire
from ..transport.dtypes import dtype_name
from .batcher import Batcher
from .call import Call

if TYPE_CHECKING:
    from .admission import Admission
    from .fastlane import FastLane
    from .records import _Model

__all__ = ["Shortcut"]


@dataclass(frozen=True)
class _Known:
    """What the full path found out about a model's requests."""

    model: _Model
    queue: Batcher
    name: str  # the one input's name
    dtype: torch.dtype
    rest: torch.Size  # its dimensions after the batch dimension
    wire_dtype: str
    row_bytes: int
    max_rows: int
    max_bytes: int  # inline (in the header) and joinable with others
    key: int  # the hub's batch key
    level: int  # the queue level of a request without a priority
    limit: int  # that level's max_queue_size (0: none)
    reject: bool  # that level times requests out itself (Batcher.deadline)


class Shortcut:
    """Admits requests to hub-batched models that match one admitted before (from any
    thread: what it remembers is replaced whole, and its counter is not exact across
    threads)."""

    def __init__(self, admission: Admission, lane: FastLane) -> None:
        self.admission = admission
        self.lane = lane
        #: the router's latest version of each model (a model loaded anew replaces its entry)
        self._default = lane.router.default
        self._known: dict[str, _Known] = {}
        #: requests admitted here (for tests and the curious)
        self.taken = 0

    def take(self, model: str, inputs: dict[Any, Any], timeout: Any) -> Call | None:
        """The call for ``inputs`` (to ``model``'s default version), if the request is
        like the one remembered for it; None: admit it the full way."""
        known = self._known.get(model)
        if known is None or len(inputs) != 1:
            return None
        m = known.model
        if (
            m.lane < 0
            or m.failed is not None
            or m.unavailable is not None
            or m.queue is not known.queue
            or self._default.get(model) is not m
        ):
            return None
        t = inputs.get(known.name)
        if type(t) is not torch.Tensor or t.dtype is not known.dtype:
            return None
        shape = t.shape
        rows = shape[0] if shape else 0
        if not 0 < rows <= known.max_rows or shape[1:] != known.rest:
            return None
        nbytes = rows * known.row_bytes
        if nbytes > known.max_bytes or not t.is_cpu or not tensor_io.plain(t):
            return None
        if timeout is None:
            timeout = m.cfg.timeout
        elif type(timeout) is int and 0 < timeout <= MAX_TIMEOUT_S:
            timeout = float(timeout)  # (as check_timeout makes it)
        elif type(timeout) is not float or not 0.0 < timeout <= MAX_TIMEOUT_S:
            return None  # (the full path checks it, and says what is wrong)
        if known.limit and len(known.queue.queues[known.level]) >= known.limit:
            return None
        call = Call(
            m,
            tensor_io.inline(t, known.wire_dtype, nbytes),
            None if timeout is None else time.monotonic() + timeout,
        )
        call.rows = rows
        call.priority = known.level
        if known.reject:
            call.deadline = known.queue.deadline(call, timeout)
        call.key = known.key  # (as FastLane.takes sets it)
        self.taken += 1
        return call

    def learn(self, model: str, inputs: dict[Any, Any], call: Call) -> None:
        """Remember ``call``, admitted the full way for ``inputs`` (a dict, to ``model``'s
        default version, without priority or sequence) and taken by the lane, if it went
        to the hub's batching joinable with others (one inline tensor) and later requests
        like it can be admitted by :meth:`take`."""
        m = call.model
        binder, queue, cfg = m.binder, m.queue, m.cfg
        if (
            len(inputs) != 1
            or not m.lane_batches
            or not isinstance(queue, Batcher)
            or binder is None
            or binder.dict_input
            or binder.reshapes
            or len(binder.arg_names) != 1
            or cfg.max_request_bytes is not None
            or self.admission.max_pending is not None
            or type(call.key) is not int
            or self._default.get(model) is not m
        ):
            return
        [(name, t)] = inputs.items()
        if (
            type(name) is not str
            or binder.positions.get(name) != 0
            or type(t) is not torch.Tensor
            or not t.shape
            or len(call.descs) != 1
            or call.descs[0].kind != wire.BLOB
        ):
            return
        level = queue.default_level
        policy = queue.policies[level]
        known = self._known.get(model)
        if (
            known is not None
            and known.model is m
            and known.name == name
            and known.dtype is t.dtype
            and known.rest == t.shape[1:]
        ):
            return  # (the same, learnt already)
        self._known[model] = _Known(
            model=m,
            queue=queue,
            name=name,
            dtype=t.dtype,
            rest=t.shape[1:],
            wire_dtype=dtype_name(t.dtype),
            row_bytes=t.nbytes // t.shape[0],  # (admitted: at least one row)
            max_rows=cfg.max_batch_size,
            max_bytes=min(self.admission.inline_threshold, self.lane.max_blobs),
            key=call.key,
            level=level,
            limit=policy.max_queue_size or 0,
            reject=policy.timeout_action == "REJECT" and bool(policy.default_timeout_microseconds),
        )
