"""Thread-per-instance serving in the bench process: the ``--compare threads`` baseline.

Runs entirely in the bench process. It emulates how Triton's PyTorch backend runs
several instances of one model: the TorchScript file is loaded once per instance into
the *same* process, each instance gets one thread, and requests are taken from one
shared queue by whichever instance thread is free (Triton's default scheduler). Each
thread calls its own module copy under ``torch.inference_mode()`` (``torch.no_grad()``
when ``INFERENCE_MODE`` is false).

The execution-mode flags of the model's ``parameters`` are process-wide here -- which
is the point of the comparison: they are applied to this process while the server
runs and restored when it closes. ``INTRA_OP_THREAD_COUNT`` defaults to one thread,
as libtorchrt's CPU workers do, so both modes get the same per-instance compute.
``INTER_OP_THREAD_COUNT`` cannot change once torch has started its pools and is
reported as ignored.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import re
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["ThreadServer", "bind_positional"]

_INDEXED = re.compile(r"^.+__(\d+)$")
_STOP = object()


def bind_positional(arg_names: Sequence[str], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Order named inputs by the model's arguments, as libtorchrt and Triton bind them.

    A name equal to an argument binds to it, ``<anything>__<i>`` binds to argument
    ``i``; as a last resort, as many inputs as arguments bind in their given order.

    Raises:
        ValueError: the inputs cannot be bound to the arguments.
    """
    n = len(arg_names)
    bound: list[torch.Tensor | None] = [None] * n
    positions = {name: i for i, name in enumerate(arg_names)}
    rest: list[torch.Tensor] = []
    for name, value in inputs.items():
        pos = positions.get(name)
        if pos is None:
            m = _INDEXED.match(name)
            pos = int(m.group(1)) if m else None
        if pos is None or pos >= n or bound[pos] is not None:
            rest.append(value)
        else:
            bound[pos] = value
    free = [i for i in range(n) if bound[i] is None]
    if len(rest) != len(free):
        raise ValueError(f"cannot bind inputs {list(inputs)} to the model's arguments {list(arg_names)}")
    for i, value in zip(free, rest):
        bound[i] = value
    return [b for b in bound if b is not None]


class _Flags:
    """Apply execution-mode flags to this process and put the previous values back."""

    def __init__(self, values: Mapping[str, bool | int]) -> None:
        self.values = dict(values)
        self.notes: list[str] = []
        self._restore: list[Callable[[], object]] = []

    def apply(self) -> None:
        v = self.values
        threads = torch.get_num_threads()
        torch.set_num_threads(int(v.get("INTRA_OP_THREAD_COUNT", 1)))
        self._restore.append(lambda: torch.set_num_threads(threads))
        if "DISABLE_OPTIMIZED_EXECUTION" in v:
            optimize = torch._C._get_graph_executor_optimize()
            torch._C._set_graph_executor_optimize(not v["DISABLE_OPTIMIZED_EXECUTION"])
            self._restore.append(lambda: torch._C._set_graph_executor_optimize(optimize))
        if "ENABLE_JIT_EXECUTOR" in v:
            executor = torch._C._jit_set_profiling_executor(bool(v["ENABLE_JIT_EXECUTOR"]))
            self._restore.append(lambda: torch._C._jit_set_profiling_executor(executor))
        if "ENABLE_JIT_PROFILING" in v:
            profiling = torch._C._jit_set_profiling_mode(bool(v["ENABLE_JIT_PROFILING"]))
            self._restore.append(lambda: torch._C._jit_set_profiling_mode(profiling))
        if "ENABLE_TENSOR_FUSER" in v:
            fuser = torch._C._jit_texpr_fuser_enabled()
            torch._C._jit_set_texpr_fuser_enabled(bool(v["ENABLE_TENSOR_FUSER"]))
            self._restore.append(lambda: torch._C._jit_set_texpr_fuser_enabled(fuser))
        if "DISABLE_CUDNN" in v:
            cudnn = torch.backends.cudnn.enabled
            torch.backends.cudnn.enabled = not v["DISABLE_CUDNN"]
            self._restore.append(lambda: setattr(torch.backends.cudnn, "enabled", cudnn))
        if "INTER_OP_THREAD_COUNT" in v:
            self.notes.append("INTER_OP_THREAD_COUNT ignored in threads mode (torch's pools already started)")

    def restore(self) -> None:
        while self._restore:
            self._restore.pop()()


class ThreadServer:
    """``instances`` copies of a TorchScript model, one thread each, one shared queue.

    Args:
        path: the TorchScript file.
        instances: module copies and serving threads.
        flags: parsed execution-mode flags (``ModelConfig(...).flags.values``).
        method: the module method to run.

    Use :meth:`call` (blocking) from any number of caller threads; :meth:`close`
    stops the threads and restores the process's flags. A context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        instances: int,
        *,
        flags: Mapping[str, bool | int] | None = None,
        method: str = "forward",
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._flags = _Flags(flags or {})
        self._inference_mode = bool((flags or {}).get("INFERENCE_MODE", True))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._flags.apply()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in this torch
                modules = [torch.jit.load(str(path), map_location="cpu").eval() for _ in range(instances)]
            self._methods = [getattr(m, method) for m in modules]
            schema = self._methods[0].schema
            self.arg_names = [a.name for a in schema.arguments[1:]]
        except BaseException:
            self._flags.restore()
            raise
        for i, fn in enumerate(self._methods):
            t = threading.Thread(target=self._serve, args=(fn,), name=f"bench-instance-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def notes(self) -> list[str]:
        """What the flags could not do in this mode."""
        return list(self._flags.notes)

    def _serve(self, fn: Callable[..., Any]) -> None:
        mode = torch.inference_mode() if self._inference_mode else torch.no_grad()
        get = self._queue.get
        with mode:
            while True:
                item = get()
                if item is _STOP:
                    return
                args, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)

    def bind(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The inputs in argument order (see :func:`bind_positional`)."""
        return bind_positional(self.arg_names, inputs)

    def call(self, args: Sequence[torch.Tensor], timeout: float | None = None) -> Any:
        """Run one request on the next free instance and wait for its output.

        Raises:
            RuntimeError: the server is closed.
            concurrent.futures.TimeoutError: no result within ``timeout``.
            Exception: whatever the model raised.
        """
        if self._closed:
            raise RuntimeError("the thread server is closed")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((args, future))
        return future.result(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the instance threads (after the queued requests) and restore the flags."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout)
        self._flags.restore()
        self._methods = []

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
