"""Sequence batching: a model's sequences, each kept on one instance (front).

A model with ``sequence_batching`` gets a :class:`SequenceQueue` (a
:class:`~.queues.RequestQueue` whose units are *pinned*: the router asks it for the
next unit of a given instance, :meth:`SequenceQueue.take_for`). Every request names
its sequence (``sequence_id``); the first one (``sequence_start``) places the
sequence on an instance with a free slot (``max(1, max_batch_size)`` slots each for
the direct strategy, ``max_candidate_sequences`` for the oldest), or in the backlog
until a slot frees. From then on its requests go to that instance only, one at a time
and in order, so the state the worker keeps for it (``workers/sequences.py``) is
always the one its last request left.

A batch for an instance holds at most one request per sequence:

- **direct**: the sequences holding a slot with a request waiting, in slot order;
  it leaves at once, or, with ``max_queue_delay_microseconds``, once
  ``minimum_slot_utilization`` of the slots have a request or the oldest waited the
  delay. (Triton also fills empty slots with ``READY=0`` rows, for backends that keep
  state per slot; here the state is kept per sequence, so empty slots are left out.)
- **oldest**: the instance's sequences whose head requests are the oldest, up to
  ``max_batch_size``; it leaves when full, at a ``preferred_batch_size``, or when
  the oldest waited the delay.

A sequence ends with the request flagged ``sequence_end`` (its slot frees when that
request is answered), after ``max_sequence_idle_microseconds`` with nothing queued (its
slot frees, and the worker is told to drop its state), or when its instance's
process dies: then its waiting and running requests fail with
:class:`~libtorchrt.errors.SequenceLostError`, and so do later ones until a request
starts it again. It is never moved to another instance.

Everything here runs in the router thread, except :meth:`SequenceQueue.tag`,
:meth:`~SequenceQueue.admit` and :meth:`~SequenceQueue.level`, which caller threads
use to refuse a request at once.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError, SequenceError, SequenceLostError
from ..workers.sequences import END, START
from .batch import Batch
from .batcher import BATCHES_PER_WORKER
from .queues import live
from .records import READY

if TYPE_CHECKING:
    import torch

    from ..config.model import ModelConfig
    from .call import Call
    from .records import _Model, _Worker

__all__ = ["SequenceQueue", "SequenceTag", "warmup_fields"]

#: ended, idle or lost sequences whose fate a later request is told (the oldest are forgotten)
_REMEMBERED = 4096
#: the longest string sequence id, in characters
MAX_ID_CHARS = 256
#: the largest integer sequence id (Triton's are uint64), and by CORRID type
MAX_ID = (1 << 64) - 1
_ID_MAX = {"uint64": MAX_ID, "int64": (1 << 63) - 1, "uint32": (1 << 32) - 1, "int32": (1 << 31) - 1}


@dataclass(frozen=True)
class SequenceTag:
    """A request's sequence: its id and flags, as the caller gave them."""

    id: int | str
    start: bool = False
    end: bool = False

    @property
    def flags(self) -> int:
        return (START if self.start else 0) | (END if self.end else 0)


class _Seq:
    """One running sequence: where it is, and its requests."""

    __slots__ = ("ended", "handle", "id", "instance", "last", "pending", "running")

    def __init__(self, handle: int, sequence_id: int | str, now: float) -> None:
        self.handle = handle
        self.id = sequence_id
        #: the instance holding it (-1: in the backlog, waiting for a slot)
        self.instance = -1
        #: its requests not sent yet, in order; the one sent and not answered
        self.pending: collections.deque[Call] = collections.deque()
        self.running: Call | None = None
        #: when it was last active (monotonic): idle sequences are freed
        self.last = now
        #: its last request queued ends it (only a new start may follow)
        self.ended = False


class SequenceQueue:
    """The sequences of one model (see the module docstring)."""

    pinned = True
    host_only = True
    per_worker = BATCHES_PER_WORKER

    def __init__(self, model: _Model) -> None:
        cfg = model.cfg
        seq = cfg.sequence_batching
        assert seq is not None
        self.model = model
        self.model_name = cfg.name
        self.config = seq
        self.oldest = seq.strategy == "oldest"
        #: sequences one instance holds, and rows one execution takes
        self.capacity = seq.slots(cfg.max_batch_size)
        self.batching = cfg.max_batch_size > 0
        self.rows = max(1, cfg.max_batch_size)
        self.delay = seq.max_queue_delay_microseconds / 1e6
        self.min_util = seq.minimum_slot_utilization
        self.preferred = {p for p in seq.preferred_batch_size if p <= self.rows}
        self.idle = seq.max_sequence_idle_microseconds / 1e6
        corrid = seq.corrid
        #: the type sequence ids must have (a CONTROL_SEQUENCE_CORRID input's), or None: either
        self.id_type: type | None = None if corrid is None else (str if corrid.data_type == "string" else int)
        #: the largest integer id that type holds
        self.id_max = _ID_MAX.get(corrid.data_type, MAX_ID) if corrid is not None else MAX_ID
        self.active: dict[int | str, _Seq] = {}
        #: instance -> the sequences it holds, in slot order (an instance has `capacity` slots)
        self.held: dict[int, list[_Seq]] = collections.defaultdict(list)
        self.backlog: collections.deque[_Seq] = collections.deque()
        #: ids of sequences that are gone, and why (told to a later request of theirs)
        self.gone: collections.OrderedDict[int | str, str | SequenceLostError] = collections.OrderedDict()
        #: instance -> handles whose state its worker must drop (ride on its next request)
        self.forget: dict[int, list[int]] = collections.defaultdict(list)
        self._handles = itertools.count(1)  # (0 is the warm-up's)
        self._count = 0  # requests waiting
        #: counters for stats and metrics
        self.started = 0
        self.ended = 0
        self.idle_freed = 0
        self.lost_count = 0

    # ── caller threads ─────────────────────────────────────────────────────────

    def tag(self, sequence: SequenceTag | None) -> SequenceTag:
        """Check a request's sequence.

        Raises:
            SequenceError: none given, or an id of the wrong type or range.
        """
        if sequence is None:
            raise SequenceError(
                self.model_name, None, "a sequence_id (the model has sequence_batching)", "a request without one"
            )
        sid = sequence.id
        if isinstance(sid, bool) or not isinstance(sid, (int, str)):
            raise SequenceError(self.model_name, None, "a sequence_id that is an int or a str", repr(sid))
        if isinstance(sid, int) and not 0 < sid <= self.id_max:
            what = "" if self.id_max == MAX_ID else " (its CONTROL_SEQUENCE_CORRID input's type)"
            raise SequenceError(
                self.model_name, None, f"a sequence_id from 1 to {self.id_max}{what}; 0 means none", str(sid)
            )
        if isinstance(sid, str) and not 0 < len(sid) <= MAX_ID_CHARS:
            raise SequenceError(
                self.model_name, None, f"a sequence_id string of 1 to {MAX_ID_CHARS} characters", f"{len(sid)} chars"
            )
        if self.id_type is not None and not isinstance(sid, self.id_type):
            want = "a string" if self.id_type is str else "an integer"
            raise SequenceError(
                self.model_name, sid, f"{want} sequence_id (its CONTROL_SEQUENCE_CORRID input's type)", repr(sid)
            )
        return sequence

    def level(self, priority: int | None) -> int:
        if priority is not None:
            raise InvalidInputError(self.model_name, None, "no priority (sequence batching has none)", "priority")
        return 0

    def admit(self, level: int, tensors: list[torch.Tensor]) -> None:
        if self.batching and tensors and tensors[0].shape and tensors[0].shape[0] != 1:
            raise InvalidInputError(
                self.model_name,
                None,
                "1 row per request (sequence batching batches sequences)",
                f"{tensors[0].shape[0]} rows",
            )

    def deadline(self, call: Call, timeout: float | None) -> float | None:
        return call.deadline

    # ── the router thread ──────────────────────────────────────────────────────

    def __len__(self) -> int:
        return self._count

    def add(self, call: Call, now: float) -> None:
        tag = call.sequence
        assert tag is not None
        seq = self.active.get(tag.id)
        if seq is None:
            if not tag.start:
                call.fail(self._not_running(tag.id))
                return
            seq = _Seq(next(self._handles), tag.id, now)
            self.active[tag.id] = seq
            self.gone.pop(tag.id, None)
            self.started += 1
            self._place(seq)
        elif seq.ended and not tag.start:
            call.fail(self._not_running(tag.id, "it ended (sequence_end)"))
            return
        seq.ended = tag.end
        call.holder = seq
        call.queued_at = now
        call.key = tuple((d.dtype, d.shape[1:]) for d in call.descs)  # (what must match to share a batch)
        if self.model.orderer is not None:
            self.model.orderer.number(call)
        seq.pending.append(call)
        self._count += 1

    def _not_running(self, sid: int | str, why: str | SequenceLostError | None = None) -> Exception:
        why = why or self.gone.get(sid)
        if isinstance(why, SequenceLostError):
            return why
        return SequenceError(
            self.model_name,
            sid,
            "sequence_start=True on the first request of a sequence",
            f"a request of a sequence that is not running ({why or 'it was never started'})",
        )

    def _place(self, seq: _Seq) -> None:
        """Give ``seq`` a slot: on the instance holding the fewest sequences, ready
        workers first; or put it in the backlog."""
        best = None
        for slot in self.model.slots:
            n = len(self.held[slot.instance])
            if n >= self.capacity:
                continue
            ready = slot.worker is not None and slot.worker.state == READY
            rank = (not ready, n)
            if best is None or rank < best[0]:
                best = (rank, slot.instance)
        if best is None:
            self.backlog.append(seq)
            return
        seq.instance = best[1]
        self.held[seq.instance].append(seq)

    def _close(self, seq: _Seq, why: str | SequenceLostError) -> None:
        """``seq`` is over: free its slot for the backlog's first."""
        self.active.pop(seq.id, None)
        self.gone[seq.id] = why
        if len(self.gone) > _REMEMBERED:
            self.gone.popitem(last=False)
        if seq.instance < 0:
            self.backlog.remove(seq)
            return
        held = self.held[seq.instance]
        held.remove(seq)
        while self.backlog and len(held) < self.capacity:
            nxt = self.backlog.popleft()
            nxt.instance = seq.instance
            held.append(nxt)

    def expire(self, now: float) -> None:
        """Free the sequences idle for ``max_sequence_idle_microseconds``."""
        limit = now - self.idle
        for seq in [s for s in self.active.values() if not s.pending and s.running is None and s.last <= limit]:
            if seq.instance >= 0:
                self.forget[seq.instance].append(seq.handle)
            self.idle_freed += 1
            self._close(seq, f"it was freed after {self.idle * 1e6:.0f} µs idle (max_sequence_idle_microseconds)")

    def head_device(self) -> int | None:
        return None  # (inputs are gathered in host memory)

    def take(self, now: float) -> Call | None:
        return None  # (units are pinned: see take_for)

    def take_for(self, instance: int, now: float) -> Call | None:
        """The next unit for ``instance``'s worker, marked running; None: nothing to
        send there now (or a batch waits to grow, until :meth:`wake_at`)."""
        ready = []
        for seq in self.held.get(instance, ()):
            if seq.running is not None:
                continue
            pending = seq.pending
            while pending and pending[0].future.done():  # cancelled, or its deadline passed
                self._drop(pending.popleft())
            if pending:
                ready.append(seq)
        if not ready:
            return None
        if self.oldest:
            ready.sort(key=lambda s: s.pending[0].queued_at)
        key = ready[0].pending[0].key
        chosen = [s for s in ready if s.pending[0].key == key][: self.rows]
        if not self._leaves(chosen, ready, now):
            return None
        calls = []
        for seq in chosen:
            call = seq.pending.popleft()
            self._count -= 1
            if not live(call):
                call.free()
                continue
            seq.running = call
            calls.append(call)
        if not calls:
            return None
        unit = calls[0] if len(calls) == 1 else Batch(self.model, calls)
        unit.sequences = (
            [x for c in calls for x in (c.holder.handle, c.sequence.flags)],  # type: ignore[union-attr]
            [c.sequence.id for c in calls],  # type: ignore[union-attr]
            self.forget.pop(instance, []),
        )
        return unit

    def _leaves(self, chosen: list[_Seq], ready: list[_Seq], now: float) -> bool:
        """Whether a batch of ``chosen`` leaves now, or waits for more rows."""
        if not self.delay or len(chosen) >= self.rows:
            return True
        oldest = min(s.pending[0].queued_at for s in chosen)
        if now >= oldest + self.delay:
            return True
        if self.oldest:
            return len(chosen) in self.preferred
        return len(ready) >= self.min_util * self.capacity

    def _drop(self, call: Call) -> None:
        self._count -= 1
        call.free()
        self.model.ordered_skip(call)

    def finished(self, unit: Call) -> None:
        """``unit`` was answered: its sequences may send their next request."""
        now = time.monotonic()
        for call in unit.members if isinstance(unit, Batch) else (unit,):
            seq: _Seq | None = call.holder
            if seq is None or seq.running is not call:
                continue
            seq.running = None
            seq.last = now
            if seq.ended and not seq.pending and self.active.get(seq.id) is seq:
                self.ended += 1  # (its worker dropped its state with this request)
                self._close(seq, "it ended (sequence_end)")

    def lost(self, w: _Worker) -> None:
        """``w`` died: its sequences are lost; their requests, running or waiting, fail
        (its replacement takes new sequences)."""
        instance = w.instance
        code = w.proc.returncode
        errors: dict[int | str, SequenceLostError] = {}
        for seq in list(self.held.get(instance, ())):
            error = errors[seq.id] = SequenceLostError(
                self.model_name, seq.id, instance, w.proc.pid, code, f"worker {instance} (pid {w.proc.pid}) died"
            )
            self.lost_count += 1
            for call in seq.pending:
                self._count -= 1
                call.fail(error)
            seq.pending.clear()
            seq.running = None
            self._close(seq, error)
        self.forget.pop(instance, None)
        units, w.inflight = list(w.inflight.values()), {}
        for unit in units:
            if unit.warmup:
                unit.free()
                continue
            for call in unit.members if isinstance(unit, Batch) else (unit,):
                holder = call.holder
                sid = holder.id if holder is not None else "?"
                call.fail(errors.get(sid) or SequenceLostError(self.model_name, sid, instance, w.proc.pid, code))
            unit.free()

    def requeue(self, calls: Iterable[Call], now: float) -> None:
        """Put units back (they could not be sent): each member at its sequence's
        head, its handles to forget back on the list."""
        for unit in calls:
            members = unit.members if isinstance(unit, Batch) else [unit]
            for call in members:
                seq: _Seq | None = call.holder
                if seq is None or self.active.get(seq.id) is not seq:
                    call.fail(self._not_running(seq.id if seq is not None else "?"))
                    continue
                if seq.running is call:
                    seq.running = None
                seq.pending.appendleft(call)
                self._count += 1
            if unit.sequences:
                forget = unit.sequences[2]
                if forget and members and members[0].holder is not None:
                    self.forget[members[0].holder.instance].extend(forget)
                unit.sequences = None

    def remove(self, call: Call) -> bool:
        seq = call.holder
        if seq is None:
            return False
        try:
            seq.pending.remove(call)
        except ValueError:
            return False
        self._count -= 1
        return True

    def drain(self) -> list[Call]:
        out = [c for s in self.active.values() for c in s.pending]
        for s in self.active.values():
            s.pending.clear()
        self._count = 0
        return out

    def wake_at(self) -> float | None:
        """When a sequence turns idle, or a waiting batch's delay runs out."""
        times = [s.last + self.idle for s in self.active.values() if not s.pending and s.running is None]
        if self.delay:
            times += [s.pending[0].queued_at + self.delay for s in self.active.values() if s.pending]
        return min(times) if times else None

    def counts(self) -> dict[str, int]:
        """Sequences running (holding a slot), waiting in the backlog, and ended by
        each way so far."""
        return {
            "active": sum(len(h) for h in list(self.held.values())),
            "backlog": len(self.backlog),
            "started": self.started,
            "ended": self.ended,
            "idle_freed": self.idle_freed,
            "lost": self.lost_count,
        }


def warmup_fields(cfg: ModelConfig, rows: int) -> dict[str, Any]:
    """The sequence fields of a warm-up request (``wire.Request``): each row a
    sequence of its own that starts and ends in it (handle 0), so no state is kept."""
    seq = cfg.sequence_batching
    if seq is None:
        return {}
    corrid = seq.corrid
    blank: int | str = "" if corrid is not None and corrid.data_type == "string" else 0
    return {"sequence": [0, START | END] * rows, "corrids": [blank] * rows}
