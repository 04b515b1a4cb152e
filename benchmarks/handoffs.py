"""What one round trip between two processes costs, by how the hand-off is made.

A parent and a child process ping-pong a 64-byte message ``--rounds`` times, one at a
time (each side sleeps while it waits, as a pool's front and worker do between
requests), over:

* ``zmq-ipc`` -- a ZeroMQ DEALER/ROUTER pair over ``ipc://`` (libtorchrt's front and
  workers today): each message passes the sender's and the receiver's libzmq I/O
  threads, so a round trip wakes six threads;
* ``pipe`` -- a ``multiprocessing`` ``Pipe`` (what a hand-written pool's queues use
  underneath, without their feeder and result threads);
* ``seqpacket`` -- a Unix ``SOCK_SEQPACKET`` socket pair: one ``send`` and one ``recv``
  a message, message boundaries kept, two wake-ups per round trip, no I/O thread;
* ``eventfd`` -- the message in shared memory and an eventfd each way as the doorbell:
  two wake-ups per round trip, no I/O thread.

It prints the wall time and the CPU time (both processes, from ``/proc``) per round
trip, and each against ``zmq-ipc`` side by side in the same run::

    python benchmarks/handoffs.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable

import zmq

CHILD = r"""
import mmap, os, sys
mode = sys.argv[1]
if mode == "zmq-ipc":
    import zmq
    sock = zmq.Context(1).socket(zmq.DEALER)
    sock.connect(sys.argv[2])
    sock.send(b"ready")
    while True:
        msg = sock.recv()
        if msg == b"stop":
            break
        sock.send(msg)
elif mode == "pipe":
    from multiprocessing.connection import Connection
    conn = Connection(int(sys.argv[2]))
    while True:
        msg = conn.recv_bytes()
        if msg == b"stop":
            break
        conn.send_bytes(msg)
elif mode == "seqpacket":
    import socket
    conn = socket.socket(fileno=int(sys.argv[2]))
    while True:
        msg = conn.recv(65536)
        if msg == b"stop":
            break
        conn.send(msg)
else:
    ping, pong, shm = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    buf = mmap.mmap(shm, 4096)
    while True:
        os.eventfd_read(ping)
        if buf[0] == 0:
            break
        buf[64:128] = buf[0:64]
        os.eventfd_write(pong, 1)
"""

MESSAGE = bytes(range(1, 65))


def _cpu_s(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(child: subprocess.Popen[bytes], rounds: int, once: Callable[[], None]) -> tuple[float, float]:
    """(wall µs, CPU µs of both processes) per round trip of ``once``."""
    for _ in range(min(1000, rounds)):  # warm-up
        once()
    cpu0 = _cpu_s(os.getpid()) + _cpu_s(child.pid)
    t0 = time.perf_counter()
    for _ in range(rounds):
        once()
    wall = time.perf_counter() - t0
    cpu = _cpu_s(os.getpid()) + _cpu_s(child.pid) - cpu0
    return wall / rounds * 1e6, cpu / rounds * 1e6


def zmq_ipc(rounds: int, directory: str) -> tuple[float, float]:
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{directory}/handoffs.sock"
    sock.bind(endpoint)
    child = subprocess.Popen([sys.executable, "-c", CHILD, "zmq-ipc", endpoint])
    try:
        identity, _ = sock.recv_multipart()

        def once() -> None:
            sock.send_multipart([identity, MESSAGE])
            sock.recv_multipart()

        result = _measure(child, rounds, once)
        sock.send_multipart([identity, b"stop"])
        child.wait(10)
        return result
    finally:
        child.kill()
        sock.close(0)
        ctx.term()


def pipe(rounds: int, directory: str) -> tuple[float, float]:
    from multiprocessing import Pipe

    mine, theirs = Pipe()
    child = subprocess.Popen([sys.executable, "-c", CHILD, "pipe", str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:

        def once() -> None:
            mine.send_bytes(MESSAGE)
            mine.recv_bytes()

        result = _measure(child, rounds, once)
        mine.send_bytes(b"stop")
        child.wait(10)
        return result
    finally:
        child.kill()
        mine.close()


def seqpacket(rounds: int, directory: str) -> tuple[float, float]:
    import socket

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "seqpacket", str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:

        def once() -> None:
            mine.send(MESSAGE)
            mine.recv(65536)

        result = _measure(child, rounds, once)
        mine.send(b"stop")
        child.wait(10)
        return result
    finally:
        child.kill()
        mine.close()


def eventfd(rounds: int, directory: str) -> tuple[float, float]:
    ping, pong = os.eventfd(0), os.eventfd(0)
    shm = os.memfd_create("handoffs")
    os.ftruncate(shm, 4096)
    buf = mmap.mmap(shm, 4096)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "eventfd", str(ping), str(pong), str(shm)], pass_fds=[ping, pong, shm]
    )
    try:

        def once() -> None:
            buf[0:64] = MESSAGE
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            assert buf[64] == 1

        result = _measure(child, rounds, once)
        buf[0] = 0
        os.eventfd_write(ping, 1)
        child.wait(10)
        return result
    finally:
        child.kill()
        buf.close()
        for fd in (ping, pong, shm):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20000)
    args = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        modes = {"zmq-ipc": zmq_ipc, "pipe": pipe, "seqpacket": seqpacket, "eventfd": eventfd}
        results = {name: fn(args.rounds, directory) for name, fn in modes.items()}
    base_wall, base_cpu = results["zmq-ipc"]
    print(f"{args.rounds} round trips of a 64-byte message, one at a time; load average {os.getloadavg()[0]:.2f}")
    print(f"{'hand-off':10} {'wall µs':>9} {'CPU µs':>9} {'wall vs zmq':>12} {'CPU vs zmq':>11}")
    for name, (wall, cpu) in results.items():
        print(f"{name:10} {wall:9.1f} {cpu:9.1f} {wall / base_wall:11.2f}x {cpu / base_cpu:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
