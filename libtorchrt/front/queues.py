"""A model's waiting requests, behind one interface (front process).

Every model has one :class:`RequestQueue`: a :class:`Fifo` (one request per
execution), or the :class:`~.batcher.Batcher` of dynamic batching. The router and the
admission of requests only use this interface, so neither knows which it has.

Caller threads use :meth:`RequestQueue.level`, :meth:`~RequestQueue.admit` and
:meth:`~RequestQueue.deadline` (they only read lengths); everything else runs in the
router thread.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from ..errors import InvalidInputError, SequenceError

if TYPE_CHECKING:
    import torch

    from .call import Call
    from .records import _Worker
    from .sequences import SequenceTag

__all__ = ["Fifo", "RequestQueue", "Unpinned", "live"]


class RequestQueue(Protocol):
    """What the router and admission ask of a model's queue (see the module docstring).

    A unit handed out by :meth:`take` is what one execution runs: a request, or a
    batch of them.
    """

    #: how many units one worker may hold at once (the next waits while one runs)
    per_worker: int
    #: inputs are gathered in host memory (a CUDA input is copied to the host first)
    host_only: bool
    model_name: str

    # ── caller threads ─────────────────────────────────────────────────────────

    def level(self, priority: int | None) -> int:
        """The queue level of a request asking for ``priority``.

        Raises:
            InvalidInputError: this queue has no such priority.
        """
        ...

    def admit(self, level: int, tensors: list[torch.Tensor]) -> None:
        """Refuse a request at once if it cannot be queued.

        Raises:
            QueueFullError, InvalidInputError: see the queue.
        """
        ...

    def deadline(self, call: Call, timeout: float | None) -> float | None:
        """The monotonic time at which ``call`` fails if it has not finished."""
        ...

    # ── the router thread ──────────────────────────────────────────────────────

    def __len__(self) -> int: ...

    def add(self, call: Call, now: float) -> None: ...

    def head_device(self) -> int | None:
        """The GPU the next unit's inputs are on (None: any worker can take it)."""
        ...

    def take(self, now: float) -> Call | None:
        """The next unit to send, marked running; None: nothing to send now."""
        ...

    def requeue(self, calls: Iterable[Call], now: float) -> None:
        """Put units back at the head, in order (their worker died before running them)."""
        ...

    def remove(self, call: Call) -> bool:
        """Take a waiting request out (its deadline passed); False if it is not here."""
        ...

    def drain(self) -> list[Call]:
        """Take every waiting request out (to fail them)."""
        ...

    def wake_at(self) -> float | None:
        """When the router must look again even if nothing happens (None: never)."""
        ...

    # ── pinned queues (sequence batching: each unit belongs to one instance) ──

    #: units are taken per instance (:meth:`take_for`), never by :meth:`take`
    pinned: bool

    def tag(self, sequence: SequenceTag | None) -> SequenceTag | None:
        """Check a request's sequence (caller threads).

        Raises:
            SequenceError: a sequence for a model without sequence batching, or
                none (or a bad one) for a model with it.
        """
        ...

    def take_for(self, instance: int, now: float) -> Call | None:
        """The next unit for ``instance``'s worker (pinned queues)."""
        ...

    def expire(self, now: float) -> None:
        """Drop what timed out while nothing waited (pinned queues: idle sequences)."""
        ...

    def finished(self, unit: Call) -> None:
        """``unit`` was answered."""
        ...

    def lost(self, w: _Worker) -> None:
        """``w`` died: settle what it held that cannot be sent again (its sequences);
        what is left in its ``inflight`` is re-sent or failed as usual."""
        ...

    def counts(self) -> dict[str, int]:
        """Its own counters for ``ModelStats.sequences`` (any thread; empty: none)."""
        ...


class Unpinned:
    """What a queue whose units any instance can take does for the pinned methods."""

    pinned = False
    model_name: str

    def tag(self, sequence: SequenceTag | None) -> SequenceTag | None:
        if sequence is not None:
            raise SequenceError(
                self.model_name,
                sequence.id,
                "no sequence_id (the model has no sequence_batching)",
                f"sequence_id={sequence.id!r}",
            )
        return None

    def take_for(self, instance: int, now: float) -> Call | None:
        return None

    def expire(self, now: float) -> None:
        return None

    def finished(self, unit: Call) -> None:
        return None

    def lost(self, w: _Worker) -> None:
        return None

    def counts(self) -> dict[str, int]:
        return {}


class Fifo(Unpinned):
    """One request per execution, in the order they came."""

    host_only = False

    def __init__(self, model_name: str, per_worker: int) -> None:
        self.model_name = model_name
        self.per_worker = per_worker
        self.calls: collections.deque[Call] = collections.deque()

    def level(self, priority: int | None) -> int:
        if priority is not None:
            raise InvalidInputError(
                self.model_name, None, "no priority (the model has no dynamic_batching levels)", "priority"
            )
        return 0

    def admit(self, level: int, tensors: list[torch.Tensor]) -> None:
        return None

    def deadline(self, call: Call, timeout: float | None) -> float | None:
        return call.deadline

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, call: Call, now: float) -> None:
        self.calls.append(call)

    def head_device(self) -> int | None:
        calls = self.calls
        while calls and calls[0].future.done():  # cancelled, or its deadline passed
            calls.popleft().free()
        return calls[0].device if calls else None

    def take(self, now: float) -> Call | None:
        calls = self.calls
        while calls:
            call = calls.popleft()
            if live(call):
                call.dispatched = True
                return call
            call.free()
        return None

    def requeue(self, calls: Iterable[Call], now: float) -> None:
        self.calls.extendleft(reversed(list(calls)))

    def remove(self, call: Call) -> bool:
        try:
            self.calls.remove(call)
        except ValueError:
            return False
        return True

    def drain(self) -> list[Call]:
        out = list(self.calls)
        self.calls.clear()
        return out

    def wake_at(self) -> float | None:
        return None


def live(call: Call) -> bool:
    """Whether a waiting call is still to be sent: marks a fresh one running (it can
    no longer be cancelled); one that was cancelled, or whose deadline passed while
    it waited to be re-sent, is not."""
    if not call.dispatched:
        if not call.future.set_running_or_notify_cancel():
            return False
        call.dispatched = True
        return True
    return not call.future.done()
