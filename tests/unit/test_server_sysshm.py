"""System shared memory (libtorchrt/server/sysshm.py) with real POSIX shared-memory
objects in /dev/shm, and the KServe codec reading inputs from and writing outputs into
them (kserve.py): no server, no process."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from libtorchrt.server import kserve
from libtorchrt.server.http import Limits, ServerState, build_app
from libtorchrt.server.kserve import RequestError, decode_request, encode_response, read_shared_inputs
from libtorchrt.server.sysshm import (
    Regions,
    RegionStatus,
    SharedMemoryError,
    ShmRef,
    is_local_peer,
    owner_for_token,
)

SHM = Path("/dev/shm")
ME = "anonymous"

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")


@pytest.fixture
def shm() -> Iterator[Callable[[int], str]]:
    """Make shared-memory objects (as shm_open does): returns their keys, "/name";
    unlinks them after the test."""
    made: list[Path] = []

    def make(size: int, data: bytes = b"") -> str:
        name = f"libtorchrt-test-{uuid.uuid4().hex[:12]}"
        path = SHM / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if data:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        made.append(path)
        return "/" + name

    yield make  # type: ignore[misc]
    for path in made:
        path.unlink(missing_ok=True)


def fds_to(key: str) -> list[int]:
    """This process's descriptors open on the object ``key``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(SHM / key.lstrip("/")):
                out.append(int(fd))
        except OSError:
            pass
    return out


def refused(code: str, words: str, call: Callable[[], object]) -> SharedMemoryError:
    with pytest.raises(SharedMemoryError) as e:
        call()
    assert e.value.code == code, e.value.message
    assert words in e.value.message, e.value.message
    return e.value


# ── registration ─────────────────────────────────────────────────────────────


def test_register_status_unregister(shm: Callable[..., str]) -> None:
    a, b = shm(64), shm(32)
    with Regions() as regions:
        assert regions.register("in", a, 0, 64, ME) == RegionStatus("in", a, 0, 64)
        regions.register("out", b.lstrip("/"), 8, 16, ME)  # (glibc's shm_open takes the name without '/' too)
        assert [s.name for s in regions.status(None, ME)] == ["in", "out"]
        assert regions.status("out", ME)[0].to_json() == {"name": "out", "key": b.lstrip("/"), "offset": 8,
                                                           "byte_size": 16}  # fmt: skip
        assert len(fds_to(a)) == 1 and len(regions) == 2
        assert regions.unregister("in", ME) == ["in"]
        assert fds_to(a) == [] and [s.name for s in regions.status(None, ME)] == ["out"]
        assert regions.unregister("in", ME) == []  # not registered: no error, as in Triton
        refused("NOT_FOUND", "no system shared memory region 'in' is registered", lambda: regions.status("in", ME))
        assert regions.unregister(None, ME) == ["out"] and not regions.status(None, ME)
    assert fds_to(b) == []


def test_regions_of_other_owners_are_invisible(shm: Callable[..., str]) -> None:
    key = shm(16)
    alice, bob = owner_for_token(b"alice-token-0123456789"), owner_for_token(b"bob-token-0123456789ab")
    assert alice != bob and alice == owner_for_token(b"alice-token-0123456789") and "alice" not in alice
    with Regions() as regions:
        regions.register("r", key, 0, 16, alice)
        regions.register("r", key, 0, 8, bob)  # names are per owner
        assert regions.status(None, ME) == []
        refused("NOT_FOUND", "'r'", lambda: regions.read("r", 0, 4, ME))
        assert regions.unregister(None, bob) == ["r"]
        assert regions.status("r", alice)[0].byte_size == 16


@pytest.mark.parametrize(
    ("key", "offset", "size", "code", "words"),
    [
        ("/libtorchrt-test-missing", 0, 4, "INVALID_ARG", "No such file or directory (the client must create it"),
        ("/a/b", 0, 4, "INVALID_ARG", "is not a POSIX shared memory name"),
        ("/", 0, 4, "INVALID_ARG", "is not a POSIX shared memory name"),
        ("/..", 0, 4, "INVALID_ARG", "is not a POSIX shared memory name"),
        (7, 0, 4, "INVALID_ARG", "is not a POSIX shared memory name"),
        (None, 60, 8, "INVALID_ARG", "offset 60 + byte_size 8 is past the end of"),
        (None, 0, 0, "INVALID_ARG", "byte_size must be an integer >= 1, got 0"),
        (None, -1, 4, "INVALID_ARG", "offset must be an integer >= 0, got -1"),
        (None, 0, True, "INVALID_ARG", "byte_size must be an integer >= 1, got True"),
        (None, 0, "4", "INVALID_ARG", "byte_size must be an integer >= 1, got '4'"),
    ],
)
def test_bad_registrations_say_why_and_leave_nothing(
    shm: Callable[..., str], key: object, offset: object, size: object, code: str, words: str
) -> None:
    real = shm(64)
    before = set(os.listdir("/proc/self/fd"))
    with Regions() as regions:
        refused(code, words, lambda: regions.register("r", real if key is None else key, offset, size, ME))  # type: ignore[arg-type]
        assert len(regions) == 0
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_duplicate_name_is_refused_and_the_first_stays(shm: Callable[..., str]) -> None:
    a, b = shm(16), shm(16)
    with Regions() as regions:
        regions.register("r", a, 0, 16, ME)
        refused("ALREADY_EXISTS", "'r' is already registered; unregister it first",
                lambda: regions.register("r", b, 0, 16, ME))  # fmt: skip
        assert regions.status("r", ME)[0].key == a and fds_to(b) == []


def test_bad_names_and_links_and_directories_are_refused(shm: Callable[..., str], tmp_path: Path) -> None:
    key = shm(16)
    link = SHM / f"libtorchrt-test-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(SHM / key.lstrip("/"))
    try:
        with Regions() as regions:
            loop = "Too many levels of symbolic links"
            refused("INVALID_ARG", loop, lambda: regions.register("r", "/" + link.name, 0, 4, ME))
            for name in ("", "x" * 300, "a\nb", 5):
                refused("INVALID_ARG", "a shared memory region's name", lambda: regions.register(name, key, 0, 4, ME))  # type: ignore[arg-type]  # noqa: B023
        with Regions(directory=str(tmp_path)) as regions:  # (a directory is not an object)
            (tmp_path / "d").mkdir()
            refused("INVALID_ARG", "cannot register", lambda: regions.register("r", "/d", 0, 4, ME))
    finally:
        link.unlink()


def test_the_number_of_regions_is_bounded(shm: Callable[..., str]) -> None:
    key = shm(16)
    with Regions(max_regions=3) as regions:
        for i in range(3):
            regions.register(f"r{i}", key, 0, 16, ME)
        refused("RESOURCE_EXHAUSTED", "3 shared memory regions are registered already",
                lambda: regions.register("r3", key, 0, 16, ME))  # fmt: skip
        regions.unregister("r0", ME)
        regions.register("r3", key, 0, 16, ME)
        assert len(fds_to(key)) == 3


def test_close_unregisters_everything_and_refuses_more(shm: Callable[..., str]) -> None:
    key = shm(16)
    regions = Regions()
    regions.register("a", key, 0, 16, ME)
    regions.register("b", key, 0, 16, owner_for_token(b"someone-else-0123456"))
    regions.close()
    regions.close()  # idempotent
    assert fds_to(key) == [] and len(regions) == 0
    refused("UNAVAILABLE", "shutting down", lambda: regions.register("c", key, 0, 16, ME))
    assert SharedMemoryError("UNAVAILABLE", "x").http_status == 503
    assert (SHM / key.lstrip("/")).exists()  # the client's: never unlinked here


# ── data ─────────────────────────────────────────────────────────────────────


def test_read_and_write_within_the_window(shm: Callable[..., str]) -> None:
    key = shm(64, bytes(range(64)))
    with Regions() as regions:
        regions.register("r", key, 16, 32, ME)  # bytes 16..47 of the object
        assert regions.read("r", 0, 4, ME) == bytes([16, 17, 18, 19])
        assert regions.read("r", 28, 4, ME) == bytes([44, 45, 46, 47])
        assert regions.write("r", 4, 8, b"\xff" * 3, ME) == 3
        with open(SHM / key.lstrip("/"), "rb") as f:
            data = f.read()
        assert data[20:23] == b"\xff" * 3 and data[23] == 23 and len(data) == 64
        past = "input 'x': offset 30 + byte size 4 is past the end of shared memory region 'r' (32 bytes)"
        refused("INVALID_ARG", past, lambda: regions.read("r", 30, 4, ME, "input 'x'"))
        refused("INVALID_ARG", "output 'y' needs 9 bytes but its shared memory (region 'r') was given 8",
                lambda: regions.write("r", 0, 8, b"\x00" * 9, ME, "output 'y'"))  # fmt: skip
        refused("INVALID_ARG", "past the end", lambda: regions.write("r", 30, 8, b"\x00", ME))


def test_a_region_its_client_removed_or_shrank_fails_cleanly(shm: Callable[..., str]) -> None:
    removed, shrunk = shm(64), shm(64)
    with Regions() as regions:
        regions.register("removed", removed, 0, 64, ME)
        regions.register("shrunk", shrunk, 8, 32, ME)
        (SHM / removed.lstrip("/")).unlink()  # shm_unlink: our descriptor still holds the memory
        refused("INVALID_ARG", "was removed by its client", lambda: regions.read("removed", 0, 4, ME))
        refused("INVALID_ARG", "was removed by its client", lambda: regions.write("removed", 0, 4, b"1234", ME))
        os.truncate(SHM / shrunk.lstrip("/"), 16)  # a mapping of it would SIGBUS the server now
        refused("INVALID_ARG", "was shrunk by its client to 16 bytes", lambda: regions.read("shrunk", 0, 4, ME))
        refused("INVALID_ARG", "was shrunk", lambda: regions.write("shrunk", 0, 4, b"1234", ME))
        os.truncate(SHM / shrunk.lstrip("/"), 64)  # grown back: usable again
        assert regions.read("shrunk", 0, 4, ME) == b"\x00" * 4
        assert regions.unregister(None, ME) == ["removed", "shrunk"]
    assert fds_to(shrunk) == []


def test_unregistering_a_region_in_use_closes_it_after_the_use(shm: Callable[..., str]) -> None:
    key = shm(16)
    with Regions() as regions:
        regions.register("r", key, 0, 16, ME)
        with regions._using("r", ME):  # a request reading it, in another thread
            assert regions.unregister("r", ME) == ["r"]
            assert len(fds_to(key)) == 1  # still read
            regions.register("r", key, 0, 8, ME)  # the name is free at once
            assert len(fds_to(key)) == 2
        assert len(fds_to(key)) == 1 and regions.status("r", ME)[0].byte_size == 8


def test_concurrent_use_from_threads(shm: Callable[..., str]) -> None:
    key = shm(4096)
    errors: list[BaseException] = []
    with Regions() as regions:
        regions.register("r", key, 0, 4096, ME)

        def work(k: int) -> None:
            try:
                for i in range(200):
                    data = bytes([k]) * 16
                    regions.write("r", k * 16, 16, data, ME)
                    assert regions.read("r", k * 16, 16, ME) == data
                    regions.register(f"t{k}-{i}", key, 0, 16, ME)
                    regions.unregister(f"t{k}-{i}", ME)
            except BaseException as e:  # (reported below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(fds_to(key)) == 1


def test_references_in_parameters() -> None:
    assert ShmRef.from_parameters({}, "input 'x'") is None
    assert ShmRef.from_parameters({"binary_data_size": 4}, "input 'x'") is None
    ref = ShmRef.from_parameters({"shared_memory_region": "r", "shared_memory_byte_size": 8}, "input 'x'")
    assert ref == ShmRef("r", 8, 0)
    ref = ShmRef.from_parameters(
        {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": 16}, "x"
    )
    assert ref == ShmRef("r", 8, 16)
    with pytest.raises(SharedMemoryError, match="input 'x': parameter 'shared_memory_offset' needs"):
        ShmRef.from_parameters({"shared_memory_offset": 4}, "input 'x'")


def test_local_peers() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", None, "unix"):
        assert is_local_peer(host), host
    for host in ("10.0.0.1", "192.168.1.2", "2001:db8::1", "example.com"):
        assert not is_local_peer(host), host


# ── the codec: inputs from, outputs into, regions ────────────────────────────


def _body(doc: dict[str, object]) -> bytearray:
    return bytearray(json.dumps(doc).encode())


def test_shared_inputs_and_outputs_through_the_codec(shm: Callable[..., str]) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    text = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"cde"))
    key = shm(256, x.tobytes() + text)
    with Regions() as regions:
        regions.register("in", key, 0, 64, ME)
        regions.register("out", key, 128, 128, ME)
        doc = {
            "inputs": [
                {"name": "y", "shape": [1], "datatype": "INT32", "data": [7]},  # mixed with a body input
                {"name": "x", "shape": [2, 3], "datatype": "FP32",
                 "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": 24}},
                {"name": "s", "shape": [3], "datatype": "BYTES",
                 "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": len(text),
                                "shared_memory_offset": 24}},
            ],
            "outputs": [
                {"name": "o", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 24,
                                             "shared_memory_offset": 8}},
                {"name": "t", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 64,
                                             "shared_memory_offset": 64}},
                {"name": "p", "parameters": {"binary_data": False}},
            ],
        }  # fmt: skip
        req = decode_request(_body(doc), None, "m")
        assert list(req.inputs) == ["y", "x", "s"] and req.inputs["x"] is None  # (in request order)
        assert kserve.shared_input_bytes(req) == 24 + len(text)
        read_shared_inputs(req, regions, ME)
        assert torch.equal(req.inputs["x"], torch.from_numpy(x)) and req.inputs["s"] == [b"ab", b"", b"cde"]
        outputs = {"o": torch.from_numpy(x) * 2, "t": ["x", "yz"], "p": torch.tensor([1, 2])}
        encoded = encode_response("m", 1, req, outputs, 1 << 20, regions=regions, owner=ME)
        header = json.loads(encoded.header)
        assert encoded.chunks == [] and encoded.header_length is None
        assert header["outputs"] == [
            {"name": "o", "datatype": "FP32", "shape": [2, 3],
             "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 24, "shared_memory_offset": 8}},
            {"name": "t", "datatype": "BYTES", "shape": [2],
             "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 4 + 1 + 4 + 2,
                            "shared_memory_offset": 64}},
            {"name": "p", "datatype": "INT64", "shape": [2], "data": [1, 2]},
        ]  # fmt: skip
        got = regions.read("out", 8, 24, ME)
        assert np.array_equal(np.frombuffer(got, np.float32).reshape(2, 3), x * 2)
        assert regions.read("out", 64, 11, ME) == struct.pack("<I", 1) + b"x" + struct.pack("<I", 2) + b"yz"


def test_codec_errors_name_the_tensor(shm: Callable[..., str]) -> None:
    key = shm(64)
    with Regions() as regions:
        regions.register("r", key, 0, 16, ME)

        def infer(doc: dict[str, object], outputs: dict[str, object] | None = None) -> None:
            req = decode_request(_body(doc), None, "m")
            read_shared_inputs(req, regions, ME)
            if outputs is not None:
                encode_response("m", 1, req, outputs, regions=regions, owner=ME)

        def shared(name: str, size: int, offset: int = 0, region: str = "r") -> dict[str, object]:
            return {"shared_memory_region": region, "shared_memory_byte_size": size, "shared_memory_offset": offset}

        x = {"name": "x", "shape": [2], "datatype": "FP32", "parameters": shared("x", 8)}
        cases: list[tuple[dict[str, object], dict[str, object] | None, int, str]] = [
            ({"inputs": [{**x, "parameters": shared("x", 8, region="nope")}]}, None, 400,
             "input 'x': no system shared memory region 'nope' is registered; register it first"),
            ({"inputs": [{**x, "parameters": shared("x", 8, 12)}]}, None, 400,
             "input 'x': offset 12 + byte size 8 is past the end of shared memory region 'r' (16 bytes)"),
            ({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": shared("s", 16)}]}, None, 400,
             "input 's': shape [2] holds 2 elements, the binary data has 4"),  # 16 zero bytes: 4 empty strings
            ({"inputs": [x], "outputs": [{"name": "o", "parameters": shared("o", 8)}]}, {"o": torch.zeros(3)}, 400,
             "output 'o' needs 12 bytes but its shared memory (region 'r') was given 8 (shared_memory_byte_size)"),
            ({"inputs": [x], "outputs": [{"name": "o", "parameters": shared("o", 12, 8)}]}, {"o": torch.zeros(3)},
             400, "output 'o': offset 8 + byte size 12 is past the end of shared memory region 'r' (16 bytes)"),
        ]  # fmt: skip
        for doc, outputs, status, message in cases:
            with pytest.raises(RequestError) as e:
                infer(doc, outputs)
            assert (e.value.status, e.value.message) == (status, message)
        regions.close()
        with pytest.raises(RequestError) as e:
            infer({"inputs": [x]})
        assert e.value.status == 400  # (closed: every region is gone)


# ── the HTTP endpoints (the ASGI application, without a server) ──────────────


def _call(app: Any, method: str, path: str, body: bytes = b"", host: str = "127.0.0.1") -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-length", str(len(body)).encode())], "server": ("127.0.0.1", 80),
             "client": (host, 5000)}  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    data = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], json.loads(data) if data else None


def test_http_endpoints_register_only_from_this_host(shm: Callable[..., str]) -> None:
    key = shm(64)
    state = ServerState(None, Limits())
    app = build_app(state)
    body = json.dumps({"key": key, "offset": 0, "byte_size": 64}).encode()
    try:
        status, doc = _call(app, "POST", "/v2/systemsharedmemory/region/r/register", body, host="10.1.2.3")
        assert status == 403 and "only a client on this host" in doc["error"]
        assert _call(app, "POST", "/v2/systemsharedmemory/region/r/register", body, host="::1") == (200, None)
        assert _call(app, "GET", "/v2/systemsharedmemory/region/r/status") == (
            200,
            [{"name": "r", "key": key, "offset": 0, "byte_size": 64}],
        )
        status, doc = _call(app, "POST", "/v2/systemsharedmemory/region/r/register", body)
        assert status == 409 and "already registered" in doc["error"]
        for bad, words in ((b"{", "not JSON"), (b"[]", "expected a JSON object"), (b"x" * 70000, "larger than")):
            status, doc = _call(app, "POST", "/v2/systemsharedmemory/region/s/register", bad)
            assert status in (400, 413) and words in doc["error"], doc
        assert _call(app, "GET", "/v2/systemsharedmemory/region/s/status")[0] == 404
        assert _call(app, "GET", "/v2/cudasharedmemory/status") == (200, [])
        assert _call(app, "POST", "/v2/systemsharedmemory/unregister") == (200, None)
        assert _call(app, "GET", "/v2/systemsharedmemory/status") == (200, [])
        token = b"a-token-of-the-tests-0123456789"
        secured = build_app(state, token=token)  # (the shared-memory endpoints need the token too)
        assert _call(secured, "GET", "/v2/systemsharedmemory/status")[0] == 401
    finally:
        state.regions.close()
    assert fds_to(key) == []
