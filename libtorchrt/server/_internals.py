"""The server's only reach into the ``Pool``'s private state (front process).

Every function here stands in for a public accessor that the pool does not have yet;
each says which one. Nothing else in ``libtorchrt/server`` touches a private attribute
of the pool, so switching to the public API is a change to this file alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..front.pool import Pool
from ..info import ModelHealth

__all__ = ["ArenaUsage", "arena_usage", "router_thread", "start_pool"]

#: called, while the pool starts, with a function returning each model's health
StartObserver = Callable[[Callable[[], dict[str, ModelHealth]]], None]


@dataclass(frozen=True)
class ArenaUsage:
    """One model version's request arena (shared memory its requests' tensors occupy)."""

    model: str
    version: int
    used: int
    size: int


def arena_usage(pool: Pool) -> list[ArenaUsage]:
    """Bytes in use in each model version's request arena, and its size. Stands in for
    arena figures in ``ModelStats`` (e.g. ``arena_bytes_in_use``, ``arena_bytes``)."""
    out = []
    for (name, version), m in list(pool._router.models.items()):
        try:
            used = int(m.allocator.used)
        except RuntimeError:  # the allocator changed while it was summed: skip this scrape
            continue
        out.append(ArenaUsage(name, version, used, int(m.arena.size)))
    return out


def router_thread(pool: Pool) -> threading.Thread:
    """The pool's router thread, whose end the server watches for. Stands in for a
    public "wait until the pool stops" (e.g. ``pool.wait_closed()``)."""
    thread: threading.Thread = pool._router._thread
    return thread


def start_pool(repository: str | os.PathLike[str], observe: StartObserver, **kwargs: Any) -> Pool:
    """``Pool(repository, **kwargs)``, calling ``observe(health)`` as soon as the pool's
    router exists, so that start-up progress can be shown while ``Pool()`` blocks.

    Stands in for a start-up hook on ``Pool`` (e.g. ``Pool(..., wait=False)`` with
    ``pool.wait_started()``, or an ``on_progress`` callback): the pool publishes its
    router by assigning ``self._router`` before it waits for the workers, and the
    subclass below sees that assignment.
    """
    return _ObservedPool(repository, _observe=observe, **kwargs)


class _ObservedPool(Pool):
    _observe: StartObserver | None = None

    def __init__(self, repository: str | os.PathLike[str], *, _observe: StartObserver, **kwargs: Any) -> None:
        self._observe = _observe
        super().__init__(repository, **kwargs)

    @property
    def _router(self) -> Any:
        return self.__dict__["_observed_router"]

    @_router.setter
    def _router(self, router: Any) -> None:
        self.__dict__["_observed_router"] = router
        observe, self._observe = self._observe, None
        if observe is not None:
            observe(router.health)
