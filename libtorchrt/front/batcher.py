"""Dynamic batching: forming batches of a model's queued requests (front).

A model with ``max_batch_size > 0`` and a ``dynamic_batching`` block gets a
:class:`Batcher`. Its requests wait in one queue per priority level (1 is the highest).
The router asks it for the next :class:`Batch` whenever an instance can take one (each
instance keeps up to two batches, so the next is waiting when one finishes), and at the
moments it says (:meth:`Batcher.wake_at`). A batch is formed from the requests at the
head of the highest non-empty level whose non-batch dimensions and dtypes match the
oldest one's (others are never merged: no padding, no ragged batches), up to
``max_batch_size`` rows, and leaves:

- at once, when the rows queued reach ``max_batch_size``, or the next request would
  not fit in it (waiting cannot grow the batch), or they make up one of the
  ``preferred_batch_size`` (the largest preferred size that the queued requests make
  up exactly is sent, leaving the rest to grow);
- otherwise when its oldest request has waited ``max_queue_delay_microseconds``
  (at once with a delay of 0), with whatever rows there are.

The front never concatenates: a batch is the list of its requests' own placements, and
the worker views the rows where they lie when they are adjacent in shared memory, or
gathers them with one copy (see ``workers/worker.py``). The worker's outputs come back
as one tensor per output; the router hands each request a view of its own rows.

The fast lane's native hub forms the batches of ``infer_async`` requests to a model of
one queue (no priority levels, ordering or queue policy) by these same rules, in C
(``transport/_lanes.c``, ``dispatch``): a change to the rules here belongs there too.

Everything here runs in the router thread, except :meth:`Batcher.admit` and
:meth:`Batcher.level`, which caller threads use to refuse a request before it is
placed (a full queue); they only read lengths.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..config.batching import DynamicBatching, QueuePolicy
from ..errors import InvalidInputError, QueueFullError
from .batch import Batch
from .queues import Unpinned

if TYPE_CHECKING:
    from .call import Call
    from .records import _Model

__all__ = ["Batch", "Batcher", "Orderer"]

#: Batches sent ahead to one worker: the next one waits while one runs.
BATCHES_PER_WORKER = 2
#: distinct batch keys a batcher keeps (a model sent ever new shapes starts over)
_MAX_KEYS = 256


class Batcher(Unpinned):
    """The request queues and batch forming of one model (see the module docstring);
    a :class:`~.queues.RequestQueue`."""

    per_worker = BATCHES_PER_WORKER
    host_only = True

    def __init__(self, model: _Model) -> None:
        cfg = model.cfg
        db = cfg.dynamic_batching
        assert db is not None and cfg.max_batch_size > 0
        self.model = model
        self.name = self.model_name = cfg.name
        self.max_rows = cfg.max_batch_size
        self.preferred = sorted({p for p in db.preferred_batch_size if p <= self.max_rows}, reverse=True)
        self.delay = db.max_queue_delay_microseconds / 1e6
        self.preserve_ordering = db.preserve_ordering
        self.levels = db.priority_levels
        self.default_level = db.default_priority_level if db.priority_levels else 0
        self.queues: dict[int, collections.deque[Call]] = {
            level: collections.deque() for level in (range(1, self.levels + 1) if self.levels else (0,))
        }
        self.policies = {level: _policy(db, level) for level in self.queues}
        #: batch keys seen, each kept once: equal keys are the same object (``is``)
        self._keys: dict[Any, Any] = {}

    # ── caller threads ─────────────────────────────────────────────────────────

    def level(self, priority: int | None) -> int:
        """The queue level of a request asking for ``priority``.

        Raises:
            InvalidInputError: a priority outside ``1..priority_levels``.
        """
        if priority is None:
            return self.default_level
        if not self.levels or isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidInputError(self.name, None, f"a priority in 1..{self.levels}", repr(priority))
        if not 1 <= priority <= self.levels:
            raise InvalidInputError(self.name, None, f"a priority in 1..{self.levels}", str(priority))
        return priority

    def admit(self, level: int, tensors: list[torch.Tensor]) -> None:
        """Refuse a request at once if it has no rows, its inputs disagree on their rows,
        or its level's queue is full.

        Raises:
            InvalidInputError: a request of 0 rows (it would be a member of no batch), or
                whose input tensors differ in their first dimension (joined with others
                row by row, it would fail its whole batch).
            QueueFullError: ``max_queue_size`` requests of that level wait already.
        """
        if tensors and tensors[0].shape:
            rows = tensors[0].shape[0]
            batch = "dynamic batching: dim 0 is the batch"
            if not rows:
                raise InvalidInputError(self.name, None, f"at least 1 row ({batch})", "0 rows")
            for i, t in enumerate(tensors[1:], 1):
                if isinstance(t, torch.Tensor) and (not t.shape or t.shape[0] != rows):
                    expected = f"every input with the same rows ({batch}): {rows}"
                    raise InvalidInputError(self.name, None, expected, f"input {i} of shape {list(t.shape)}")
        limit = self.policies[level].max_queue_size
        if limit and len(self.queues[level]) >= limit:
            raise QueueFullError(self.name, limit, "max_queue_size")

    def deadline(self, call: Call, timeout: float | None) -> float | None:
        """The deadline of a request: its own, or its level's queue timeout (REJECT)."""
        policy = self.policies[call.priority]
        if policy.timeout_action != "REJECT" or not policy.default_timeout_microseconds:
            return call.deadline
        queue_timeout = policy.default_timeout_microseconds / 1e6
        if timeout is not None and policy.allow_timeout_override:
            queue_timeout = min(queue_timeout, timeout)
        at = time.monotonic() + queue_timeout
        return at if call.deadline is None else min(call.deadline, at)

    # ── the router thread ──────────────────────────────────────────────────────

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def add(self, call: Call, now: float) -> None:
        orderer = self.model.orderer
        if orderer is not None:
            orderer.number(call)
        self.queues[call.priority].append(call)
        call.queued_at = now
        call.key = self._key(call)

    def _key(self, call: Call) -> Any:
        """What must match for requests to share a batch: dtypes and non-batch dims
        (a one-input key is a pair, never equal to a several-input one, a tuple of
        pairs), as one shared object per distinct key."""
        descs = call.descs
        if len(descs) == 1:
            d = descs[0]
            key: Any = (d.dtype, d.shape[1:])
        else:
            key = tuple((d.dtype, d.shape[1:]) for d in descs)
        keys = self._keys
        found = keys.get(key)
        if found is None:
            if len(keys) >= _MAX_KEYS:
                keys.clear()  # (calls queued with an old key still compare equal: see next_batch)
            found = keys[key] = key
        return found

    def head_device(self) -> int | None:
        return None  # (batches are gathered in host memory)

    def take(self, now: float) -> Batch | None:
        return self.next_batch(now)

    def requeue(self, calls: Iterable[Call], now: float) -> None:
        """Put calls back at the head (re-sent after their worker died), in order,
        keeping the time they were first queued."""
        for call in reversed(list(calls)):
            members = call.members if isinstance(call, Batch) else [call]
            for member in reversed(members):
                self.queues[member.priority].appendleft(member)
                if member.key is None:
                    member.queued_at = now
                    member.key = self._key(member)

    def remove(self, call: Call) -> bool:
        """Take a queued call out (its deadline passed); False if it is not queued."""
        try:
            self.queues[call.priority].remove(call)
        except ValueError:
            return False
        return True

    def drain(self) -> list[Call]:
        out = [c for q in self.queues.values() for c in q]
        for q in self.queues.values():
            q.clear()
        return out

    def _drop(self, call: Call) -> None:
        call.free()
        self.model.ordered_skip(call)

    def wake_at(self) -> float | None:
        """When the oldest waiting request's delay runs out (None: nothing waits)."""
        times = [q[0].queued_at for q in self.queues.values() if q]
        return min(times) + self.delay if times else None

    def next_batch(self, now: float) -> Batch | None:
        """The batch to send now, or None if the requests should wait longer."""
        for queue in self.queues.values():
            if not queue:
                continue
            while queue and queue[0].future.done():  # cancelled, or its deadline passed
                self._drop(queue.popleft())
            if not queue:
                continue
            head = queue[0]
            queued_at, key = head.queued_at, head.key
            max_rows = self.max_rows
            picked: list[Call] = []
            rows = 0
            full = False  # the next request does not fit: waiting cannot grow the batch
            for call in queue:
                if call.key is not key and call.key != key:
                    continue  # never merged: a batch of its own later
                if rows + call.rows > max_rows:
                    full = True
                    break
                picked.append(call)
                rows += call.rows
                if rows == max_rows:
                    full = True
                    break
            take = 0
            if full:
                take = len(picked)
            elif self.preferred:
                sums = list(itertools.accumulate(c.rows for c in picked))  # rows after each
                for size in self.preferred:  # the largest preferred size made up exactly
                    if size in sums:
                        take = sums.index(size) + 1
                        break
            if not take and now >= queued_at + self.delay:
                take = len(picked)
            if not take:
                return None  # the highest level waits: lower ones wait behind it
            chosen = picked[:take]
            if queue[take - 1] is chosen[-1]:  # the usual case: the head of the queue
                for _ in range(take):
                    queue.popleft()
            else:
                for call in chosen:
                    queue.remove(call)
            return Batch(self.model, chosen)
        return None


def _policy(db: DynamicBatching, level: int) -> QueuePolicy:
    return db.priority_queue_policy.get(level, db.default_queue_policy)


class Orderer:
    """Hands results out in the order requests came (``preserve_ordering``).

    Requests are numbered as the router takes them in; a result that arrives before
    those of earlier requests is held until they have one. A request that fails (or
    is cancelled) releases its turn at once; its error is not held.
    """

    def __init__(self) -> None:
        self._next = 0
        self._expect = 0
        self._held: dict[int, tuple[Call, Any]] = {}

    def number(self, call: Call) -> None:
        call.seq = self._next
        self._next += 1

    def arrive(self, call: Call, result: Any) -> None:
        self._put(call, result)

    def skip(self, call: Call) -> None:
        self._put(call, None)

    def _put(self, call: Call, result: Any) -> None:
        if call.seq < self._expect or call.seq in self._held:
            return  # already had its turn
        self._held[call.seq] = (call, result)
        while self._expect in self._held:
            ready, value = self._held.pop(self._expect)
            self._expect += 1
            if value is not None:
                ready.deliver(value)
