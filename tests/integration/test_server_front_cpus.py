"""``libtorchrt-pool --front-cpus``: the server's threads on the front's CPU (but the
hub's), its workers' on the others, a request still answered; a value that leaves the
workers no CPU stops the server with the configuration error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.server_util import ServerProcess, alive, build_repository, request

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split between front and workers"),
]


def cpus(pid: int, *, skip: str = "") -> set[frozenset[int]]:
    """The CPU sets of the threads of process ``pid`` (but those named ``skip``)."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip() == skip:
                continue
        found.add(frozenset(os.sched_getaffinity(int(tid))))
    return found


def test_the_server_and_its_workers_run_on_their_own_cpus(tmp_path: Path) -> None:
    mine = frozenset(os.sched_getaffinity(0))
    front, rest = frozenset({min(mine)}), mine - {min(mine)}
    repo = build_repository(tmp_path, ("resnet_classifier",))
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "off", "--front-cpus", "1"
    )
    try:
        proc.wait_ready()
        workers = proc.workers()
        assert workers
        assert cpus(proc.proc.pid, skip="libtorchrt-hub") == {front}
        assert all(cpus(pid) == {rest} for pid in workers)
        status, _, _ = request(proc.http, "GET", "/v2/models/resnet_classifier/ready")
        assert status == 200
        assert proc.stop() == 0, proc.output
        assert not any(alive(pid) for pid in workers)
    finally:
        proc.kill()


def test_front_cpus_that_leave_no_cpu_for_the_workers_stop_the_server(tmp_path: Path) -> None:
    repo = build_repository(tmp_path, ("resnet_classifier",))
    every = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    proc = ServerProcess(
        "--model-repository", str(repo), "--http", "127.0.0.1:0", "--metrics", "off", "--front-cpus", every + ","
    )
    try:
        assert proc.wait(60) != 0
        assert "front_cpus" in proc.output and "leaves no CPU for the workers" in proc.output, proc.output
    finally:
        proc.kill()
