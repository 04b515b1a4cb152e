"""The template's messages (workers/template_wire.py) and the front's fork-or-exec rule."""

from __future__ import annotations

import pytest

from libtorchrt.workers import template_wire as tw
from libtorchrt.workers.launcher import needs_exec


@pytest.mark.parametrize(
    "msg",
    [
        tw.TemplateReady(12, 1),
        tw.Spawn('{"model": "m"}', {"A": "1"}, ["stderr", "request_fd"]),
        tw.Spawned(345),
        tw.Status(345),
        tw.Exited(345, -9),
        tw.Exited(345, None, known=False),
        tw.Refused("no"),
    ],
)
def test_every_message_round_trips(msg: tw.Message) -> None:
    assert tw.decode(tw.encode(msg)) == msg


@pytest.mark.parametrize(
    "data",
    [
        b"\x80 not json",
        b"[1, 2]",
        b'{"kind": "pickle", "pid": 1}',
        b'{"pid": 1}',
        b'{"kind": "status"}',  # a field missing
        b'{"kind": "status", "pid": 1, "extra": 2}',
        b'{"kind": "status", "pid": "1"}',
        b'{"kind": "status", "pid": true}',  # (a bool is no pid)
        b'{"kind": "exited", "pid": 1, "code": 1.5}',
        b'{"kind": "spawn", "spec": "{}", "env": {"A": 1}}',
        b'{"kind": "spawn", "spec": "{}", "fds": [3]}',
        b'{"kind": "spawn", "spec": "{}", "fds": ' + str(["x_fd"] * 17).replace("'", '"').encode() + b"}",
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(tw.TemplateWireError):
        tw.decode(data)


def test_only_what_exec_reads_makes_a_worker_start_fresh() -> None:
    template = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1"}
    # applied after the fork: the thread counts, glibc's malloc settings, anything else
    worker = {**template, "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "MALLOC_MMAP_THRESHOLD_": "2"}
    assert needs_exec({**worker, "CUDA_LAUNCH_BLOCKING": "1", "X": "y"}, template) is None
    # read when the process starts, or when a library is loaded (in the template)
    for key in ("LD_PRELOAD", "PYTHONPATH", "GLIBC_TUNABLES", "OMP_PROC_BIND", "KMP_AFFINITY", "TORCH_LOGS"):
        assert needs_exec({**worker, key: "x"}, template) == key
    assert needs_exec({k: v for k, v in worker.items() if k != "PATH"}, template) is None
    assert needs_exec(worker, {**template, "PYTHONHASHSEED": "0"}) == "PYTHONHASHSEED"  # (unset in the worker)
