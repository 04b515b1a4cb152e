"""The front's side of the template process (front process, the router thread).

::

    front (router thread)                         template process                 worker
    ─────────────────────                         ────────────────                 ──────
    Template.start ── Popen(python -m ...template) ─► import torch, gc.freeze()
                   ◄──────────────── READY ───────────
    Template.spawn ── SPAWN(spec, env) + fds ───────► fork() ─────────────────────► setsid, fds, env,
                   ◄──────────────── SPAWNED(pid) ─── (closes its copies)           worker.main
    pidfd_open(pid)   ... the worker runs; the front's pidfd becomes readable when it exits ...
    ForkedProcess.poll ── STATUS(pid) ──────────────► waitpid(WNOHANG)
                   ◄──────────────── EXITED(code) ───

A :class:`Template` owns the template process (its ``Popen``) and the front's end of
their socket pair; a :class:`ForkedProcess` is the handle on one forked worker, with
what the front uses of ``Popen``: ``pid``, ``returncode``, ``poll``, ``wait``,
``kill``, ``terminate``. The worker is not the front's child, so its end is seen through
a pidfd (which ``os.pidfd_open`` gives for any process) and signals go through the same
pidfd (``pidfd_send_signal``: never to a reused pid); its exit status comes from the
template, which reaps it. A worker whose template died is no longer anyone's child the
front can ask: its status is then :data:`UNKNOWN_EXIT` (255, as ``multiprocessing``'s
forkserver reports it).

Messages and their checks are in ``template_wire.py``; the template's side, and what
fork changes for a worker, in ``template.py``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from . import template_wire as tw

__all__ = ["MALLOC_ENV", "UNKNOWN_EXIT", "ForkedProcess", "Template", "TemplateError", "needs_exec", "worker_env"]

log = logging.getLogger("libtorchrt.worker")

#: glibc returns big freed blocks to the OS and page-faults them back on the next
#: call; with a fixed mmap threshold (its maximum, 32 MiB) and a high trim threshold,
#: a worker's per-call buffers stay mapped. Measured on the cnn workload (docs/benchmarks.md).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
#: The exit status of a forked worker whose template died before telling it.
UNKNOWN_EXIT = 255
#: How long the front waits for an answer to a request (a fork takes milliseconds).
REPLY_TIMEOUT = 10.0
#: Variables that the worker's process reads only when it is exec'ed, or that its
#: libraries read when they are loaded (in the template, before the fork): a worker whose
#: environment differs from the template's in one of these is spawned fresh instead.
#: OMP_NUM_THREADS, MKL_NUM_THREADS and glibc's MALLOC_* settings are excepted: the
#: forked worker applies them itself (template.py).
EXEC_PREFIXES: tuple[str, ...] = ("LD_", "PYTHON", "GLIBC_TUNABLES", "MALLOC_CONF", "TORCH_", "PYTORCH_")
EXEC_PREFIXES += ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO_", "DNNL_", "ONEDNN_")
_APPLIED_AFTER_FORK = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS"})


class TemplateError(OSError):
    """The template could not fork a worker: it is gone, broke the protocol, or
    refused (``refused``: it is alive, and forks no worker in its state). ``sent``: it
    broke after it got the request, so whether it forked the worker is unknown (the
    descriptors sent must not be given to another worker)."""

    def __init__(self, message: str, *, refused: bool = False, sent: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.sent = sent


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """A worker's whole environment: the front's, the malloc defaults, then ``env``."""
    full = dict(os.environ)
    for key, value in MALLOC_ENV.items():
        full.setdefault(key, value)
    full.update(env)
    return full


def needs_exec(env: Mapping[str, str], template_env: Mapping[str, str]) -> str | None:
    """The first variable of ``env`` (a worker's whole environment) that a fork of a
    template started with ``template_env`` cannot apply, or None."""
    for key in sorted(set(env) | set(template_env)):
        if key.startswith(EXEC_PREFIXES) and key not in _APPLIED_AFTER_FORK and env.get(key) != template_env.get(key):
            return key
    return None


class Template:
    """The pool's template process, and the front's end of its socket (one owner
    thread: the router's, whose exit also ends the template: ``PR_SET_PDEATHSIG``).

    :meth:`start` returns at once; the template says READY when torch is imported
    (:meth:`read_ready` or :meth:`wait_ready`); :meth:`spawn` forks a worker;
    :meth:`close` ends it (idempotent).
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        #: the environment the template was started with
        self.env: dict[str, str] = {}
        self.ready = False
        #: why it can no longer fork (it died, broke the protocol, or was closed)
        self.broken: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    @property
    def usable(self) -> bool:
        """Ready, and not known to be broken."""
        return self.ready and self.broken is None

    @property
    def fd(self) -> int:
        """The socket, readable when the template says READY or dies (-1 once closed)."""
        return self.sock.fileno() if self.sock is not None else -1

    def start(self) -> None:
        """Start the template process (it imports torch while this returns).

        Raises:
            OSError: the process could not be started.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = worker_env({})
        # No thread pool in the template: OpenBLAS (numpy's) starts its pool when it is
        # loaded, sized by OMP_NUM_THREADS; every worker sets its own count (template.py).
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "libtorchrt.workers.template", str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=env,
                # Own session: a Ctrl-C in the terminal reaches the front only.
                start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self.env = env

    def read_ready(self) -> bool:
        """Take what the template sent unasked (its socket was readable): READY, or its
        end. Returns False if it is gone (``broken`` says why)."""
        if self.sock is None or self.broken is not None:
            return False
        if not _readable(self.sock, 0.0):
            return True  # (nothing after all)
        try:
            msg = self._recv(0.0)
        except TemplateError as e:
            self._break(str(e))
            return False
        if isinstance(msg, tw.TemplateReady) and not self.ready:
            self.ready = True
            log.debug("template process (pid %d) ready, %d thread(s)", msg.pid, msg.threads)
            return True
        self._break(f"unexpected {type(msg).__name__} message from the template")
        return False

    def wait_ready(self, timeout: float) -> None:
        """Block until the template is READY.

        Raises:
            TemplateError: it died, or was not ready within ``timeout`` seconds.
        """
        if self.ready:
            return
        if self.sock is None or self.broken is not None:
            raise TemplateError(f"the template process is gone: {self.broken}")
        if not _readable(self.sock, timeout):
            self._break(f"not ready within {timeout:g} s")
            raise TemplateError(f"the template process was not ready within {timeout:g} s")
        if not self.read_ready():
            raise TemplateError(f"the template process failed to start: {self.broken}")

    def spawn(self, spec: str, env: Mapping[str, str], fds: Mapping[str, int]) -> ForkedProcess:
        """Fork a worker running ``spec`` (JSON) with environment ``env``; ``fds`` are
        its descriptors by name (``"stderr"``, then the spec's fields).

        Raises:
            TemplateError: the template is not ready, is gone, or refused.
        """
        if not self.ready:
            raise TemplateError("the template process is not ready")
        reply = self._request(tw.Spawn(spec, dict(env), list(fds)), list(fds.values()))
        if isinstance(reply, tw.Refused):
            raise TemplateError(f"the template refused to fork: {reply.reason}", refused=True)
        if not isinstance(reply, tw.Spawned):
            self._break(f"answered a spawn with {type(reply).__name__}")
            raise TemplateError(f"the template process broke: {self.broken}", sent=True)
        return ForkedProcess(self, reply.pid)

    def status(self, pid: int) -> tw.Exited:
        """How worker ``pid`` (forked by this template) ended; ``code`` None: it runs.

        Raises:
            TemplateError: the template is gone.
        """
        reply = self._request(tw.Status(pid))
        if not isinstance(reply, tw.Exited) or reply.pid != pid:
            self._break(f"answered a status request with {reply!r}")
            raise TemplateError(f"the template process broke: {self.broken}")
        return reply

    def close(self) -> int | None:
        """End the template (idempotent): close the socket (its end of file makes it
        exit), wait a little, then SIGKILL. Returns its exit status."""
        self.broken = self.broken or "closed"
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        proc = self.proc
        if proc is None:
            return None
        try:
            return proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5.0)

    # ── the socket ─────────────────────────────────────────────────────────────

    def _break(self, why: str) -> None:
        """Record why it can no longer be used, and make sure it is gone: a template
        that answers wrongly or late must not fork anything more (its end of file then
        tells the supervisor to start another)."""
        if self.broken is None:
            code = self.proc.poll() if self.proc is not None else None
            self.broken = why if code is None else f"{why} (it exited with {code})"
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def _request(self, msg: tw.Message, fds: list[int] | None = None) -> tw.Message:
        if self.sock is None or self.broken is not None:
            raise TemplateError(f"the template process is gone: {self.broken}")
        try:
            if fds:
                socket.send_fds(self.sock, [tw.encode(msg)], fds)
            else:
                self.sock.send(tw.encode(msg))
        except OSError as e:
            self._break(f"send failed: {e}")
            raise TemplateError(f"the template process is gone: {self.broken}") from e
        try:
            return self._recv(REPLY_TIMEOUT)
        except TemplateError as e:
            # It got the request and did not answer (_break stops it before it forks late).
            self._break(str(e))
            raise TemplateError(f"the template process broke: {self.broken}", sent=True) from e

    def _recv(self, timeout: float) -> tw.Message:
        assert self.sock is not None
        if not _readable(self.sock, timeout):
            raise TemplateError(f"no answer within {timeout:g} s")
        try:
            data = self.sock.recv(tw.MAX_MESSAGE)
        except OSError as e:
            raise TemplateError(f"receive failed: {e}") from e
        if not data:
            raise TemplateError("its socket is closed")
        try:
            return tw.decode(data)
        except tw.TemplateWireError as e:
            raise TemplateError(f"a malformed message: {e}") from None


def _readable(sock: socket.socket, timeout: float | None) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


class ForkedProcess:
    """A worker forked by a :class:`Template`: what the front uses of ``Popen``.

    Owns a pidfd on the worker (its end, and signals without a pid-reuse race).
    """

    def __init__(self, template: Template, pid: int) -> None:
        self.template = template
        self.pid = pid
        self.returncode: int | None = None
        # (the template reaps only while it answers the front, and the front asks
        # nothing before this: the pid is still this worker's)
        self._pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        """The exit status if the worker has ended, else None."""
        if self.returncode is None and self._pidfd >= 0 and _ended(self._pidfd, 0.0):
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to end; its exit status.

        Raises:
            subprocess.TimeoutExpired: it still runs after ``timeout`` seconds.
        """
        if self.returncode is None:
            if self._pidfd < 0 or not _ended(self._pidfd, timeout):
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            self._collect()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass  # it has ended already

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Release the pidfd (idempotent); the process is not touched."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _collect(self) -> None:
        """The worker has ended: ask the template how."""
        deadline = time.monotonic() + 1.0
        while True:
            try:
                reply = self.template.status(self.pid)
            except TemplateError as e:
                log.warning("worker pid %d ended; its exit status is unknown: %s", self.pid, e)
                self.returncode = UNKNOWN_EXIT
                return
            if reply.code is not None:
                self.returncode = reply.code
                return
            if not reply.known or time.monotonic() > deadline:
                # (not the template's child: it was reaped by someone else)
                self.returncode = UNKNOWN_EXIT
                return
            time.sleep(0.001)  # ended an instant ago: the template sees it very soon


def _ended(pidfd: int, timeout: float | None) -> bool:
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)
