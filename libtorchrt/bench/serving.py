"""What a sweep group measures against, and how its callers behave (bench process).

A :class:`Server` is whatever answers the requests of one group of configurations: a
pool the bench started (``processes``), the thread server of ``threads.py``
(``threads``), or a running ``libtorchrt-pool`` reached over HTTP or ZeroMQ
(``remote.py``). Each hands the load generator a ``call`` that issues one request and
returns once it is answered.

Every caller behaves like an application, whatever the server:

* **a different input for each request** -- :class:`InputFeed` cycles through a few
  input sets generated up front (different seeds), so that consecutive requests never
  send the same tensors, without spending the caller's CPU on making data while it is
  being measured;
* **the result is read** -- :func:`consume` reads every output once (a sum) before the
  next request. A caller that drops its result measures less than an application pays:
  outputs that are views of shared memory would never even be faulted in.

With a :class:`~libtorchrt.bench.callers.Behaviour` (``--realistic``), the feed's callers
go further, as ``callers.Application`` does: a fresh copy of the input set for every
request, and every output reduced to a Python float (:meth:`InputFeed.application`).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .callers import Application, Behaviour

__all__ = ["InputFeed", "Server", "consume"]


class InputFeed:
    """The input sets of one configuration, taken in turn by every caller thread.

    Args:
        sets: the request's tensors by input name, one dict per set (at least one).
        behaviour: when given, callers behave as it says (:meth:`application`)
            instead of sending the sets themselves and reading the outputs.
    """

    def __init__(self, sets: Sequence[Mapping[str, torch.Tensor]], behaviour: Behaviour | None = None) -> None:
        if not sets:
            raise ValueError("an InputFeed needs at least one input set")
        self.sets = [dict(s) for s in sets]
        self.behaviour = behaviour
        # next() on itertools.count is one C call: atomic under the GIL, so the caller
        # threads share one counter without a lock.
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self.sets)

    def take(self) -> int:
        """The index of the set the next request sends."""
        return next(self._counter) % len(self.sets)

    def application(
        self,
        send: Callable[[dict[str, torch.Tensor]], Any],
        empty: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Callable[[], None] | None:
        """With a behaviour: a ``call`` that makes each request's input (where ``empty``
        says, if given), sends it with ``send`` and uses the answer as the behaviour says
        (``callers.Application``); None without."""
        if self.behaviour is None:
            return None
        return Application(self.sets, self.behaviour, empty=empty).call(send)


def consume(result: Any) -> None:
    """Read every tensor of ``result`` once (a dict, a sequence, one tensor or array)."""
    if isinstance(result, torch.Tensor):
        if result.numel():
            result.sum()
    elif isinstance(result, np.ndarray):  # tritonclient's outputs: read-only arrays
        if result.size and result.dtype != object:
            result.sum()
    elif isinstance(result, Mapping):
        for value in result.values():
            consume(value)
    elif isinstance(result, (list, tuple)):
        for value in result:
            if not isinstance(value, (str, bytes)):  # a string output is already read
                consume(value)


class Server(ABC):
    """What one group of configurations runs against; closed when the group is done.

    Attributes:
        notes: remarks shown with every row of the group (a parameter ignored, ...).
        flags: the execution-mode flags the instances reported (JSON ``flags``).
    """

    notes: list[str]
    flags: dict[str, Any]

    @abstractmethod
    def caller(self, feed: InputFeed) -> Callable[[], object]:
        """A ``call`` for the load generator: one request with the feed's next input
        set, waited for, its outputs read (:func:`consume`); raises if it failed."""

    def news(self) -> list[str]:
        """Remarks about what happened since the last call (worker restarts, ...)."""
        return []

    @abstractmethod
    def close(self) -> None:
        """Release what the server holds (idempotent)."""

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
