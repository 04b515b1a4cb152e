"""The front's handle on one worker process (runs in the front process).

A :class:`WorkerProcess` starts a worker either by forking it from the pool's template
process (``launcher.Template``: milliseconds, torch's pages shared) or as a fresh
interpreter (``python -m libtorchrt.workers``, a second or more: the ``"spawn"`` start
method, and the fallback for a worker the template cannot fork). Never a fork of the
front itself: CUDA and torch's thread pools do not survive fork. Either way the worker
gets its own environment, the arenas' and its request channel's descriptors (by
``pass_fds``, or ``SCM_RIGHTS`` to the template), and its stderr on a pipe that the
router thread reads (so that a dying worker's last words reach the error). Its death is
observed through a ``pidfd``, which the router polls together with its sockets: a dead
worker is an event, never a timeout.
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
from .launcher import MALLOC_ENV, ForkedProcess, Template, TemplateError, needs_exec, worker_env
from .worker import WorkerSpec

__all__ = ["MALLOC_ENV", "WorkerProcess"]

log = logging.getLogger("libtorchrt.worker")

_STDERR_LINES = 40


class WorkerProcess:
    """One running worker: its process, response arena, pidfd and stderr pipe.

    Args:
        spec: the worker's spec; ``request_fd`` (the model's request arena, shared by
            its instances and owned by the caller) must be set; the other fd fields
            are filled in here.
        watch_fd: read end of the front's watch pipe (see ``worker._die_with_parent``).
        env: extra environment variables for this worker only.
        template: fork the worker from this template process if it can (else, and
            when None, start a fresh interpreter).
    """

    def __init__(
        self, spec: WorkerSpec, watch_fd: int, env: Mapping[str, str], template: Template | None = None
    ) -> None:
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
        read_end, write_end = os.pipe()
        try:
            self.proc = self._start(spec, worker_env(env), write_end, template)
        except BaseException:
            os.close(read_end)
            self.responses.close()
            raise
        finally:
            os.close(write_end)  # (the worker has its own copy now)
        #: whether it was forked from the template (else: a fresh interpreter)
        self.forked = isinstance(self.proc, ForkedProcess)
        # The worker holds its memfd now; the front keeps only the mapping.
        self.responses.close_fd()
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.stderr_fd = read_end
        os.set_blocking(self.stderr_fd, False)

    @staticmethod
    def _start(
        spec: WorkerSpec, env: dict[str, str], stderr: int, template: Template | None
    ) -> subprocess.Popen[bytes] | ForkedProcess:
        fds = spec.fds()
        if template is not None:
            var = needs_exec(env, template.env)
            if var is not None:
                log.info("worker %s/%d is started fresh: %s is not the template's", spec.model, spec.instance, var)
            else:
                try:
                    return template.spawn(spec.to_json(), env, {"stderr": stderr, **fds})
                except TemplateError as e:
                    if e.sent:
                        raise  # (it may have forked the worker: these fds are not reused)
                    log.warning("worker %s/%d is started fresh: %s", spec.model, spec.instance, e)
        return subprocess.Popen(
            [sys.executable, "-m", "libtorchrt.workers", spec.to_json()],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=tuple(fds.values()),
            env=env,
            # Own session: a Ctrl-C in the terminal reaches the front, which then
            # shuts the workers down in order, instead of killing them mid-request.
            start_new_session=True,
        )

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
        if self.stderr_fd >= 0:
            self.read_stderr()
            os.close(self.stderr_fd)
            self.stderr_fd = -1
        if isinstance(self.proc, ForkedProcess):
            self.proc.close()
        self.responses.close()
