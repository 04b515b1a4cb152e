"""Baselines: the model called in-process, and a hand-written multiprocessing pool.

``MpQueuePool`` is the "naive alternative" a user would write without a serving
library: N ``torch.multiprocessing`` (spawn) workers, each loading the model with
one intra-op thread, fed from one shared request queue with numpy arrays; the
replies come back on one result queue, and a dispatcher thread in the caller's
process resolves per-request ``concurrent.futures.Future`` objects.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

from benchmarks import workloads
from benchmarks._proc import child_setup, children_ignore_sigint, stop_process

_READY = "ready"


def direct_call(path: str | Path, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Load the model in this process; return a zero-argument call of it on ``x``.

    The caller must run it under ``torch.inference_mode()`` (thread-local) and
    with ``torch.set_num_threads(1)`` for the single-instance ceiling.
    """
    model = workloads.load(path)
    return lambda: model(x)


def _mp_worker(path: str, requests: Any, results: Any, index: int) -> None:
    """Worker loop: ``(req_id, ndarray)`` in, ``(req_id, ok, ndarray | error)`` out."""
    child_setup()
    torch.set_num_threads(1)
    model = workloads.load(path)
    results.put((_READY, index, None))
    with torch.inference_mode():
        while True:
            item = requests.get()
            if item is None:
                break
            req_id, array = item
            try:
                out = model(torch.from_numpy(array)).numpy()
                results.put((req_id, True, out))
            except Exception as exc:  # reported to the caller
                results.put((req_id, False, repr(exc)))


class MpQueuePool:
    """A fair, reasonable hand-written process pool (see module docstring)."""

    def __init__(self, path: str | Path, processes: int, *, start_timeout: float = 120.0) -> None:
        ctx = tmp.get_context("spawn")
        self._requests = ctx.Queue()
        self._results = ctx.Queue()
        self._pending: dict[int, Future[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._procs = [
            ctx.Process(
                target=_mp_worker,
                args=(str(path), self._requests, self._results, i),
                name=f"mpq-worker-{i}",
                daemon=True,
            )
            for i in range(processes)
        ]
        self._dispatcher: threading.Thread | None = None
        self._closed = False
        try:
            with children_ignore_sigint():
                for p in self._procs:
                    p.start()
            self._wait_ready(start_timeout)
            self._dispatcher = threading.Thread(target=self._dispatch, name="mpq-dispatch", daemon=True)
            self._dispatcher.start()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < len(self._procs):
            dead = [p.name for p in self._procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"mp-queue workers died during start-up: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError("mp-queue workers did not start in time")
            try:
                tag, _, _ = self._results.get(timeout=0.5)
            except queue.Empty:
                continue
            if tag == _READY:
                ready += 1

    def _dispatch(self) -> None:
        while True:
            item = self._results.get()
            if item is None:
                return
            req_id, ok, payload = item
            with self._lock:
                fut = self._pending.pop(req_id, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(payload)
            else:
                fut.set_exception(RuntimeError(f"worker error: {payload}"))

    def pids(self) -> list[int]:
        """The worker processes' ids (for reading their CPU time)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def submit(self, array: np.ndarray) -> Future[np.ndarray]:
        """Queue one request; the future resolves to the output array."""
        if self._closed:
            raise RuntimeError("pool is closed")
        fut: Future[np.ndarray] = Future()
        req_id = next(self._ids)
        with self._lock:
            self._pending[req_id] = fut
        self._requests.put((req_id, array))
        return fut

    def infer(self, array: np.ndarray, timeout: float = 60.0) -> np.ndarray:
        """Submit one request and wait for its output (fails fast if a worker died)."""
        fut = self.submit(array)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fut.result(timeout=0.5)
            except FutureTimeoutError:
                dead = [p.name for p in self._procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"mp-queue workers died: {dead}") from None
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        """Stop workers (sentinels, then terminate/kill) and the dispatcher."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.pid is not None and p.exitcode is None:
                self._requests.put(None)
        forced = False
        for p in self._procs:
            forced |= stop_process(p)
        if self._dispatcher is not None:
            self._results.put(None)
            self._dispatcher.join(timeout=10)
        with self._lock:
            for fut in self._pending.values():
                fut.cancel()
            self._pending.clear()
        if forced:
            self._requests.cancel_join_thread()
            self._results.cancel_join_thread()
        for q in (self._requests, self._results):
            q.close()
            q.join_thread()

    def __enter__(self) -> MpQueuePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
