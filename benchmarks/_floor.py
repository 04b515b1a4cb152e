"""Transport floor: moving a 4 MiB tensor to another process and back a small reply.

No pool and no model, just the transport, in three variants:

* ``floor-premapped``: A copies the tensor into a memfd mapped once in both
  processes, then a small ZeroMQ (ipc://) request/reply;
* ``floor-fresh-shm``: a new ``multiprocessing.shared_memory`` segment per request
  (create, write, send its name, B attaches and copies, A closes and unlinks);
* ``floor-mp-queue``: the tensor (a fresh clone per request, as a real request
  would be) through a ``torch.multiprocessing`` queue, a small reply back.

In every variant B copies the data out into a preallocated tensor.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch
import torch.multiprocessing as tmp
import zmq

from benchmarks._harness import Measurement, measure
from benchmarks._proc import child_env, child_setup, children_ignore_sigint, stop_popen, stop_process

FLOOR_MODES = ("floor-premapped", "floor-fresh-shm", "floor-mp-queue")
_REPLY_TIMEOUT_S = 60.0
_START_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _zmq_child(mode: str, nbytes: int, fd: int = -1) -> Iterator[Any]:
    """Start ``_floor_child`` in ``mode``; yield ``send_recv(msg) -> bytes``."""
    tmpdir = tempfile.mkdtemp(prefix="torchrt-floor-")
    endpoint = f"ipc://{tmpdir}/floor.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    child: subprocess.Popen[bytes] | None = None
    try:
        sock.bind(endpoint)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks._floor_child",
            mode,
            "--endpoint",
            endpoint,
            "--nbytes",
            str(nbytes),
            "--fd",
            str(fd),
        ]
        with children_ignore_sigint():
            child = subprocess.Popen(cmd, pass_fds=(fd,) if fd >= 0 else (), env=child_env())
        proc = child
        timeout = _START_TIMEOUT_S  # the first reply includes the child's start-up

        def send_recv(msg: bytes) -> bytes:
            nonlocal timeout
            sock.send(msg)
            deadline = time.monotonic() + timeout
            while not sock.poll(200):
                if proc.poll() is not None:
                    raise RuntimeError(f"floor child exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"floor child did not answer in {timeout:g} s")
            timeout = _REPLY_TIMEOUT_S
            return sock.recv()

        yield send_recv
        send_recv(b"stop")
        stop_popen(child)
    finally:
        if child is not None and child.poll() is None:  # error path: no "stop" was sent
            stop_popen(child, grace=0.0)
        sock.close()
        ctx.term()
        shutil.rmtree(tmpdir, ignore_errors=True)


def floor_premapped(x: torch.Tensor | Sequence[torch.Tensor], **kw: Any) -> Measurement:
    """Pre-mapped memfd + small ZeroMQ messages (``kw`` goes to :func:`measure`).

    ``x``: the tensor every request sends, or several of the same size, sent in turn
    (as callers that cycle through a few prepared inputs send them: the copies then
    read memory that the last request did not leave in the cache).
    """
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    sources = [t.contiguous().numpy().data.cast("B") for t in tensors]
    sizes = sorted({s.nbytes for s in sources})
    if len(sizes) != 1:
        raise ValueError(f"the floor needs inputs of one size, got sizes {sizes or 'none'}")
    nbytes = sizes[0]
    turn = itertools.cycle(sources)
    fd = os.memfd_create("torchrt-floor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        with (
            mmap.mmap(fd, nbytes) as mapped,
            _zmq_child("premapped", nbytes, fd) as send_recv,
        ):

            def call() -> None:
                mapped[:nbytes] = next(turn)
                send_recv(b"r")

            return measure(call, concurrency=1, **kw)
    finally:
        os.close(fd)


def floor_fresh_shm(x: torch.Tensor, **kw: Any) -> Measurement:
    """A fresh ``SharedMemory`` segment per request + small ZeroMQ messages."""
    src = x.contiguous().numpy().data.cast("B")
    nbytes = src.nbytes
    with _zmq_child("fresh", nbytes) as send_recv:

        def call() -> None:
            shm = SharedMemory(create=True, size=nbytes)
            try:
                buf = shm.buf
                assert buf is not None
                buf[:nbytes] = src
                del buf
                send_recv(shm.name.encode())
            finally:
                shm.close()
                shm.unlink()

        return measure(call, concurrency=1, **kw)


def _mpq_child(requests: Any, replies: Any, numel: int) -> None:
    """B for ``floor-mp-queue``: receive tensors, copy them out, reply with an int."""
    child_setup()
    torch.set_num_threads(1)
    dst = torch.empty(numel, dtype=torch.float32)
    replies.put(0)
    while True:
        t = requests.get()
        if t is None:
            break
        dst.copy_(t.view(-1))
        del t
        replies.put(1)


def floor_mp_queue(x: torch.Tensor, **kw: Any) -> Measurement:
    """The tensor through a ``torch.multiprocessing`` queue (fd sharing)."""
    ctx = tmp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_mpq_child, args=(requests, replies, x.numel()), daemon=True)

    def get_reply(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                replies.get(timeout=0.2)
                return
            except queue.Empty:
                if proc.exitcode is not None:
                    raise RuntimeError(f"floor-mp-queue child exited with code {proc.exitcode}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"floor-mp-queue child did not answer in {timeout:g} s") from None

    try:
        with children_ignore_sigint():
            proc.start()
        get_reply(_START_TIMEOUT_S)

        def call() -> None:
            t = x.clone()  # a fresh tensor per request, as a real request would be
            requests.put(t)
            get_reply(_REPLY_TIMEOUT_S)

        return measure(call, concurrency=1, **kw)
    finally:
        if proc.exitcode is None and proc.pid is not None:
            requests.put(None)
        stop_process(proc)
        for q in (requests, replies):
            q.cancel_join_thread()
            q.close()


def run_floor(mode: str, x: torch.Tensor, **kw: Any) -> Measurement:
    """Dispatch to the floor variant named ``mode`` (one of :data:`FLOOR_MODES`)."""
    fn = {
        "floor-premapped": floor_premapped,
        "floor-fresh-shm": floor_fresh_shm,
        "floor-mp-queue": floor_mp_queue,
    }[mode]
    return fn(x, **kw)
