"""The front's handle on one worker process (runs in the front process).

A :class:`WorkerProcess` starts ``python -m libtorchrt.workers`` as a fresh interpreter
(never a fork: CUDA and torch's thread pools do not survive fork), with its own
environment, the arenas' and its request channel's descriptors passed through
``pass_fds``, and its stderr on a
pipe that the router thread reads (so that a dying worker's last words reach the error).
Its death is observed through a ``pidfd``, which the router polls together with its
sockets: a dead worker is an event, never a timeout.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping

from ..transport.arena import Arena
from .worker import WorkerSpec

__all__ = ["WorkerProcess"]

log = logging.getLogger("libtorchrt.worker")

#: glibc returns big freed blocks to the OS and page-faults them back on the next
#: call; with a fixed mmap threshold (its maximum, 32 MiB) and a high trim threshold,
#: a worker's per-call buffers stay mapped. Measured on the cnn workload (docs/benchmarks.md).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

_STDERR_LINES = 40


class WorkerProcess:
    """One running worker: its process, response arena, pidfd and stderr pipe.

    Args:
        spec: the worker's spec; ``request_fd`` (the model's request arena, shared by
            its instances and owned by the caller) must be set; the other fd fields
            are filled in here.
        watch_fd: read end of the front's watch pipe (see ``worker._die_with_parent``).
        env: extra environment variables for this worker only.
    """

    def __init__(self, spec: WorkerSpec, watch_fd: int, env: Mapping[str, str]) -> None:
        self.spec = spec
        self.responses = Arena(spec.response_bytes, name=f"libtorchrt-{spec.model}-{spec.instance}-resp")
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._partial = b""
        self.pidfd: int | None = None
        self.returncode: int | None = None
        self.started = time.monotonic()
        assert self.responses.fd is not None
        spec.response_fd = self.responses.fd
        spec.watch_fd = watch_fd
        full_env = dict(os.environ)
        for key, value in MALLOC_ENV.items():
            full_env.setdefault(key, value)
        full_env.update(env)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "libtorchrt.workers", spec.to_json()],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=tuple(fd for fd in (spec.request_fd, spec.response_fd, watch_fd, spec.channel_fd) if fd >= 0),
                env=full_env,
                # Own session: a Ctrl-C in the terminal reaches the front, which then
                # shuts the workers down in order, instead of killing them mid-request.
                start_new_session=True,
            )
        except BaseException:
            self.responses.close()
            raise
        # The worker holds its memfd now; the front keeps only the mapping.
        self.responses.close_fd()
        self.pidfd = os.pidfd_open(self.proc.pid)
        assert self.proc.stderr is not None
        self.stderr_fd = self.proc.stderr.fileno()
        os.set_blocking(self.stderr_fd, False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_stderr(self) -> bool:
        """Read what the worker wrote to stderr; log it and keep the last lines.

        Returns:
            False once the pipe is at end of file (the worker exited).
        """
        while True:
            try:
                chunk = os.read(self.stderr_fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                self.stderr_tail.append(line)
                log.info("[%s/%d pid %d] %s", self.spec.model, self.spec.instance, self.pid, line)

    def tail(self) -> str:
        """The last lines the worker wrote to stderr."""
        self.read_stderr()
        if self._partial:
            self.stderr_tail.append(self._partial.decode(errors="replace"))
            self._partial = b""
        return "\n".join(self.stderr_tail)

    def reap(self) -> int | None:
        """Return the exit code if the process has exited (negative: killed by signal)."""
        if self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the process (its exit is then seen through the pidfd)."""
        if self.reap() is None:
            self.proc.kill()

    def stop(self, grace: float) -> None:
        """Make sure the process is gone: wait ``grace``, then SIGTERM, then SIGKILL."""
        if self.wait(grace) is not None:
            return
        self.proc.terminate()
        if self.wait(1.0) is not None:
            return
        log.warning("worker %s/%d (pid %d) ignored SIGTERM; killing it", self.spec.model, self.spec.instance, self.pid)
        self.proc.kill()
        self.wait(5.0)

    def close(self) -> None:
        """Kill the process if still alive and release every descriptor and mapping."""
        if self.reap() is None:
            self.proc.kill()
            self.wait(5.0)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.read_stderr()
            self.proc.stderr.close()
        self.responses.close()
