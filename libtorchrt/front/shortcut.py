"""The admission of a request like one admitted before (front, the caller's thread:
an event loop's, or any thread calling ``Pool.infer``).

Every request passes :meth:`Admission.take`: the model looked up, its inputs bound and
checked, their bytes placed, a :class:`Call` made, its queue asked. For the callers of a
model that the hub batches, that was most of the front's work per request, paid holding
the GIL (docs/measurements/shortcut.md). Yet those callers send the same request again
and again: one input, of the dtype and non-batch shape the model accepted last time.

The same holds for the callers of a model the hub serves one request per execution
(no ``dynamic_batching``): their admission is most of the front's Python too.

So once the full path has admitted two such requests in a row that are alike,
:class:`Shortcut` remembers what it found out (the input's name, dtype and dimensions
after the batch dimension, or all of them for a model without one; the bytes a row, the
batch key, the queue's level and limits), and a later request that matches them exactly
and asks for nothing else (no version, priority or sequence; no timeout, or a plain
number of seconds in range) is admitted by comparing a few attributes. It gets the same
call, with the same fields, that the full path would make. A request that differs in
any way, or that the full path would refuse, goes the full way, which says why. (Two in
a row: requests whose shapes vary would otherwise be learnt anew each time.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from ..deadlines import MAX_TIMEOUT_S
from ..transport import tensors as tensor_io
from ..transport import wire
from ..transport.dtypes import dtype_name
from .batcher import Batcher
from .call import Call
from .queues import Fifo

if TYPE_CHECKING:
    from .admission import Admission
    from .fastlane import FastLane
    from .records import _Model

__all__ = ["Shortcut"]


@dataclass(frozen=True)
class _Known:
    """What the full path found out about a model's requests."""

    model: _Model
    queue: Batcher | Fifo
    name: str  # the one input's name
    dtype: torch.dtype
    rest: torch.Size  # its dimensions after the batch dimension (all of them: max_rows 0)
    wire_dtype: str
    row_bytes: int  # (the whole input's: max_rows 0)
    max_rows: int  # the model's max_batch_size (0: no batch dimension)
    max_bytes: int  # inline (in the header), within what one lane request carries
    key: int | None  # the hub's batch key (None: the hub does not batch the model)
    level: int  # the queue level of a request without a priority
    limit: int  # that level's max_queue_size (0: none)
    reject: bool  # that level times requests out itself (Batcher.deadline)


class Shortcut:
    """Admits requests to the hub's models that match one admitted before (from any
    thread: what it remembers is replaced whole, and its counter is not exact across
    threads)."""

    def __init__(self, admission: Admission, lane: FastLane) -> None:
        self.admission = admission
        self.lane = lane
        #: the router's latest version of each model (a model loaded anew replaces its entry)
        self._default = lane.router.default
        self._known: dict[str, _Known] = {}
        #: the last request each model admitted the full way, as learn compares them
        self._seen: dict[str, tuple[int, str, torch.dtype, torch.Size]] = {}
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
        if known.max_rows:
            rows = shape[0] if shape else 0
            if not 0 < rows <= known.max_rows or shape[1:] != known.rest:
                return None
        elif shape != known.rest:
            return None
        else:
            rows = 1  # (as Call has it)
        nbytes = rows * known.row_bytes
        if nbytes > known.max_bytes or not t.is_cpu or not tensor_io.plain(t):
            return None
        if timeout is None:
            timeout = m.cfg.timeout
        elif type(timeout) is int and 0 < timeout <= MAX_TIMEOUT_S:
            timeout = float(timeout)  # (as check_timeout makes it)
        elif type(timeout) is not float or not 0.0 < timeout <= MAX_TIMEOUT_S:
            return None  # (the full path checks it, and says what is wrong)
        if known.limit and len(cast(Batcher, known.queue).queues[known.level]) >= known.limit:
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
        call.key = known.key  # (as FastLane.takes sets it, for a batching model)
        self.taken += 1
        return call

    def learn(self, model: str, inputs: dict[Any, Any], call: Call) -> None:
        """Remember ``call``, admitted the full way for ``inputs`` (a dict, to ``model``'s
        default version, without priority or sequence) and taken by the lane, if it went
        to the hub (to its batching joinable with others, or one request per execution)
        with one inline tensor and later requests like it can be admitted by :meth:`take`."""
        m = call.model
        binder, queue, cfg = m.binder, m.queue, m.cfg
        if not isinstance(queue, (Batcher, Fifo)):
            return
        batches = isinstance(queue, Batcher)  # (which the hub forms: m.lane_batches)
        if (
            len(inputs) != 1
            or len(call.descs) != 1
            or call.descs[0].kind != wire.BLOB
            or m.lane < 0
            or (batches and not m.lane_batches)
            or binder is None
            or binder.dict_input
            or binder.reshapes
            or len(binder.arg_names) != 1
            or cfg.max_request_bytes is not None
            or self.admission.max_pending is not None
            or (batches and type(call.key) is not int)
            or self._default.get(model) is not m
        ):
            return
        [(name, t)] = inputs.items()
        if (
            type(name) is not str
            or binder.position(name) != 0
            or type(t) is not torch.Tensor
            or (cfg.max_batch_size > 0 and not t.shape)
        ):
            return
        max_rows = cfg.max_batch_size
        rest = t.shape[1:] if max_rows else t.shape
        known = self._known.get(model)
        if (
            known is not None
            and known.model is m
            and known.name == name
            and known.dtype is t.dtype
            and known.rest == rest
        ):
            return  # (the same, learnt already)
        seen = (id(m), name, t.dtype, rest)
        if self._seen.get(model) != seen:  # (learnt once it comes twice in a row: an input
            self._seen[model] = seen  # whose shape varies would otherwise be learnt anew each time)
            return
        level, limit, reject = 0, 0, False
        if isinstance(queue, Batcher):
            level = queue.default_level
            policy = queue.policies[level]
            limit = policy.max_queue_size or 0
            reject = policy.timeout_action == "REJECT" and bool(policy.default_timeout_microseconds)
        self._known[model] = _Known(
            model=m,
            queue=queue,
            name=name,
            dtype=t.dtype,
            rest=rest,
            wire_dtype=dtype_name(t.dtype),
            row_bytes=t.nbytes // t.shape[0] if max_rows else t.nbytes,  # (admitted: at least one row)
            max_rows=max_rows,
            max_bytes=min(self.admission.inline_threshold, self.lane.max_blobs),
            key=call.key if batches else None,
            level=level,
            limit=limit,
            reject=reject,
        )
