"""The template process: workers forked from an interpreter that has imported torch
(runs in the template process, and in each worker between its fork and ``worker.main``).

The pool starts it once (``python -m libtorchrt.workers.template SOCKET_FD FRONT_PID``,
``launcher.Template``). It imports torch and everything a worker imports, starts no
CUDA context and no thread pool, says READY, then serves the front's requests
(``template_wire.py``) on its end of a ``SOCK_SEQPACKET`` socket pair: SPAWN forks a
worker, STATUS says how one ended. A worker is then a ``fork()`` (milliseconds) instead
of an interpreter importing torch (a second or more), and its pages of the interpreter
and of torch are shared with the template copy-on-write (``gc.freeze()`` keeps the
cyclic collector from writing to every object the template made).

Fork copies the process as it is, so the template must hold nothing that does not
survive it, and the worker must redo what was read from its environment when the
template started:

- **Threads and CUDA.** A thread pool or a CUDA context does not survive fork. The
  template never starts one: it runs no torch op, calls neither
  ``torch.set_num_threads`` nor ``torch.cuda.*``, and is started with
  ``OMP_NUM_THREADS=1`` (numpy's OpenBLAS starts its thread pool when it is loaded,
  sized from that). Before each fork it checks ``/proc/self/task`` (one thread) and
  ``torch.cuda.is_initialized()`` (False, and no ``/dev/nvidia*`` file open), and refuses
  the request otherwise: the front then spawns that worker fresh.
- **OMP_NUM_THREADS / MKL_NUM_THREADS** were read when torch (OpenMP, MKL) was loaded in
  the template. The worker calls ``torch.set_num_threads`` with its own value at once,
  and ``flags.apply`` sets ``INTRA_OP_THREAD_COUNT`` / ``INTER_OP_THREAD_COUNT`` as it
  does in a fresh process: the inter-op pool is only created by the first inter-op
  work, which never happened in the template, so ``set_num_interop_threads`` works.
- **CUDA_LAUNCH_BLOCKING, CUDA_VISIBLE_DEVICES** are read when CUDA initializes, after
  the fork: the worker's ``os.environ`` (its own environment, sent by the front) is
  all it takes.
- **MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_** (and glibc's other ``MALLOC_*``)
  are read by glibc when the process starts: the template starts with the workers'
  defaults (``process.MALLOC_ENV``), and a worker whose value differs applies it with
  ``mallopt``.
- **What only ``exec`` reads** (``LD_*``, ``PYTHON*``, ``GLIBC_TUNABLES``, torch's and
  the OpenMP/MKL/OpenBLAS runtimes' other variables, read when they were loaded): a
  worker whose environment differs from the template's in one of those is spawned
  fresh by the front instead (``launcher.needs_exec``).
- **Random state**: numpy's global generator was seeded in the template, so each
  worker reseeds it; ``tempfile``'s cached directory is forgotten (``TMPDIR`` may
  differ).
- **Signals, session, descriptors**: the worker gets its own session (``setsid``), the
  default handlers, ``/dev/null`` as stdin, its stderr pipe as fd 2, and closes every
  descriptor but those its spec names.

The template dies with the front: ``PR_SET_PDEATHSIG`` (SIGTERM, handled: it SIGTERMs
the workers it forked that still run, then exits) for a front that dies, and the end of
file on its socket (whose other end only the front holds, so it is the template's watch
pipe) for a front that closes it. A worker does not die with the template: it watches
the front's own watch pipe (``worker._die_with_parent``), so a template killed by
someone else (or the OOM killer) leaves the pool serving; the front starts another.
The template reaps the workers it forked (on each request, ``waitpid(WNOHANG)``) and
keeps their exit status until the front asks for it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

from . import template_wire as tw

__all__ = ["MALLOPT", "main"]

_PR_SET_PDEATHSIG = 1
#: glibc's environment variables read at start-up, and the ``mallopt`` parameter of each
#: (malloc.h: M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3, M_MMAP_MAX -4,
#: M_PERTURB -6, M_ARENA_TEST -7, M_ARENA_MAX -8)
MALLOPT = {
    "MALLOC_TRIM_THRESHOLD_": -1,
    "MALLOC_TOP_PAD_": -2,
    "MALLOC_MMAP_THRESHOLD_": -3,
    "MALLOC_MMAP_MAX_": -4,
    "MALLOC_PERTURB_": -6,
    "MALLOC_ARENA_TEST": -7,
    "MALLOC_ARENA_MAX": -8,
}
#: exit statuses the template keeps for the front at most (it asks for each at once)
_KEEP = 4096


def nvidia_files() -> list[str]:
    """The NVIDIA device files this process has open: the CUDA driver (or NVML) was
    initialized here, which a fork does not survive, whatever torch says."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            found.append(target)
    return found


def threads() -> list[str]:
    """The names of this process's threads."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # (it just exited)
    return names


class _Template:
    """The template's state: its socket, the workers it forked, their exit statuses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: the environment the template started with (what its libraries read)
        self.env = dict(os.environ)
        self.children: set[int] = set()
        self.statuses: dict[int, int] = {}

    def reap(self) -> None:
        """Collect the exit status of every forked worker that ended."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.statuses[pid] = os.waitstatus_to_exitcode(status)
            if len(self.statuses) > _KEEP:  # (the front asks for each; never grow)
                del self.statuses[next(iter(self.statuses))]

    def serve(self) -> None:
        """Answer the front until it closes its end (or dies)."""
        while True:
            fds = array.array("i")
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    tw.MAX_MESSAGE, socket.CMSG_SPACE(tw.MAX_FDS * fds.itemsize)
                )
            except ConnectionResetError:
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            received = list(fds)
            if not data and not received:
                return  # the front closed its end, or died
            try:
                reply = self._answer(data, flags, received)
            finally:
                for fd in received:  # (a worker has its own copies now)
                    os.close(fd)
            self.sock.send(tw.encode(reply))

    def _answer(self, data: bytes, flags: int, fds: list[int]) -> tw.Message:
        self.reap()
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return tw.Refused("the request was truncated")
        try:
            msg = tw.decode(data)
        except tw.TemplateWireError as e:
            return tw.Refused(str(e))
        if isinstance(msg, tw.Status):
            if msg.pid in self.statuses:
                return tw.Exited(msg.pid, self.statuses.pop(msg.pid))
            return tw.Exited(msg.pid, None, known=msg.pid in self.children)
        if isinstance(msg, tw.Spawn):
            names = set(msg.fds)
            if len(msg.fds) != len(fds) or len(names) != len(fds) or "stderr" not in names:
                return tw.Refused(f"the request names descriptors {msg.fds} and carries {len(fds)}")
            if not all(name.endswith("_fd") for name in names - {"stderr"}):
                return tw.Refused(f"descriptors must be named stderr or by the spec's *_fd fields: {msg.fds}")
            return self._spawn(msg, fds)
        return tw.Refused(f"the template does not take {msg.KIND!r} messages")

    def _spawn(self, msg: tw.Spawn, fds: list[int]) -> tw.Message:
        import torch

        # The invariants that make fork safe: no other thread (a pool or a lock holder
        # would not exist in the child), no CUDA context (it cannot be used after fork).
        running = threads()
        if len(running) != 1:
            return tw.Refused(f"the template runs {len(running)} threads ({', '.join(running)}); it forks none")
        if torch.cuda.is_initialized() or nvidia_files():
            return tw.Refused(f"CUDA is initialized in the template ({nvidia_files()}); it forks no worker")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(self.sock, msg, fds, self.env)  # never returns
        self.children.add(pid)
        self.statuses.pop(pid, None)  # (a pid reused: its old status is nobody's now)
        return tw.Spawned(pid)

    def kill_children(self) -> None:
        """SIGTERM the workers still running (the front died)."""
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def _close_all_but(keep: set[int]) -> None:
    last = -1
    for fd in sorted(keep):
        if fd > last + 1:
            os.closerange(last + 1, fd)
        last = fd
    os.closerange(last + 1, 1 << 20)


def _malloc(env: Mapping[str, str], started: Mapping[str, str]) -> None:
    """Apply the glibc malloc settings of ``env`` that differ from those this process
    started with (glibc read those once, at start-up)."""
    changed = {k: env[k] for k in MALLOPT if k in env and env[k] != started.get(k)}
    if not changed:
        return
    libc = ctypes.CDLL(None)
    for key, value in changed.items():
        try:
            ok = libc.mallopt(MALLOPT[key], int(value))
        except ValueError:
            ok = 0
        if not ok:
            print(f"libtorchrt worker: could not apply {key}={value} (mallopt)", file=sys.stderr)


def _after_fork(env: Mapping[str, str], started: Mapping[str, str]) -> None:
    """Redo in the forked worker what a fresh process would have read from ``env``."""
    os.environ.clear()
    os.environ.update(env)
    _malloc(env, started)
    import torch

    threads_env = env.get("OMP_NUM_THREADS", "")
    if threads_env.isdigit() and int(threads_env) > 0:
        torch.set_num_threads(int(threads_env))
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    import tempfile

    tempfile.tempdir = None


def _child(sock: socket.socket, msg: tw.Spawn, fds: list[int], started: Mapping[str, str]) -> None:
    """The forked worker: set up its process, then run ``worker.main``; never returns."""
    code = 1
    try:
        sock.detach()  # (closed below with the rest; the object must not close a reused number)
        os.setsid()
        named = dict(zip(msg.fds, fds))
        os.dup2(named.pop("stderr"), 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _close_all_but({0, 1, 2, *named.values()})
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        spec: dict[str, Any] = json.loads(msg.spec)
        spec.update(named)
        spec["template_pid"] = os.getppid()
        _after_fork(msg.env, started)
        from .worker import main as worker_main

        code = worker_main([json.dumps(spec)])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _warm_up_loader() -> None:
    """Load a small TorchScript module once, so that what ``torch.jit.load`` sets up on
    its first call is done here, shared, instead of in every worker (tens of ms each).
    Scripting and loading run no tensor op: no thread pool starts."""
    import io

    import torch

    class _Warm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates torch.jit.*; the workers serve TorchScript anyway.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
            torch.jit.save(torch.jit.script(_Warm()), buffer)
            buffer.seek(0)
            torch.jit.load(buffer)
    except Exception as e:  # only a missed speed-up: say so and go on
        print(f"libtorchrt template: could not warm up torch.jit.load: {e!r}", file=sys.stderr)


def _die_with_front(front: int, template: _Template) -> None:
    """SIGTERM (from PR_SET_PDEATHSIG when the front dies): stop the workers, exit."""

    me = os.getpid()

    def on_sigterm(*_: object) -> None:
        if os.getpid() != me:  # a worker forked an instant ago, before its reset: default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        template.kill_children()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != front:  # it died before prctl ran
        os._exit(0)


def main(argv: list[str]) -> int:
    """Entry point of ``python -m libtorchrt.workers.template SOCKET_FD FRONT_PID``."""
    sock = socket.socket(fileno=int(argv[0]))
    template = _Template(sock)
    _die_with_front(int(argv[1]), template)
    # Ctrl-C goes to the front (the template has its own session): never to us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import numpy  # noqa: F401  (what a worker imports, so that its pages are shared)
    import torch
    import zmq  # noqa: F401

    from . import worker  # noqa: F401
    from .formats import torchscript  # noqa: F401

    _warm_up_loader()
    assert not torch.cuda.is_initialized(), "the template must never start CUDA"
    gc.collect()
    gc.freeze()
    sock.send(tw.encode(tw.TemplateReady(os.getpid(), len(threads()))))
    try:
        template.serve()
    except BrokenPipeError:
        pass
    # Nothing to clean up: leave without the interpreter's (and torch's) teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
