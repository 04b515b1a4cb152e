"""Process B of the transport floor (``python -m benchmarks._floor_child``).

It connects a ZeroMQ REP socket to ``--endpoint`` and, per request, copies the
4 MiB tensor out of shared memory into a preallocated tensor, then answers with
a small message.  Modes:

* ``premapped``: the data sits in a memfd (``--fd``, inherited) mapped once;
* ``fresh``: each request names a new ``multiprocessing.shared_memory`` segment.

A request ``b"stop"`` ends the loop.
"""

from __future__ import annotations

import argparse
import mmap
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import zmq

from benchmarks._proc import child_setup, stop_resource_tracker


def main(argv: list[str] | None = None) -> int:
    """Serve requests until ``b"stop"``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["premapped", "fresh"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--fd", type=int, default=-1)
    args = parser.parse_args(argv)
    child_setup()
    import torch  # after child_setup: the import takes a while

    torch.set_num_threads(1)

    nbytes: int = args.nbytes
    dst = torch.empty(nbytes // 4, dtype=torch.float32)
    dst_bytes = dst.numpy().data.cast("B")
    mapped = mmap.mmap(args.fd, nbytes) if args.mode == "premapped" else None
    src = memoryview(mapped) if mapped is not None else None

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.endpoint)
    try:
        while True:
            msg = sock.recv()
            if msg == b"stop":
                sock.send(b"bye")
                break
            if src is not None:
                dst_bytes[:] = src[:nbytes]
            else:
                shm = SharedMemory(name=msg.decode())
                # Python 3.11 registers attached segments too; the creator unlinks it.
                resource_tracker.unregister(f"/{shm.name}", "shared_memory")
                buf = shm.buf
                assert buf is not None
                dst_bytes[:] = buf[:nbytes]
                del buf
                shm.close()
            sock.send(b"ok")
    finally:
        sock.close()
        ctx.term()
        if src is not None:
            src.release()
        if mapped is not None:
            mapped.close()
        stop_resource_tracker()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
