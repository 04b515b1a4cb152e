"""Who may reach the server (libtorchrt/server/security.py): addresses, loopback, tokens,
CURVE keys, ipc directories, and the bearer-token middleware."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from libtorchrt.server.security import (
    Address,
    BearerAuth,
    UsageError,
    check_http,
    check_zmq,
    is_loopback,
    parse_address,
    prepare_ipc,
    read_curve_secret_key,
    read_token,
)

TOKEN = b"0123456789abcdef-token"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:8000", Address("127.0.0.1", 8000)),
        ("8000", Address("127.0.0.1", 8000)),
        ("0", Address("127.0.0.1", 0)),
        ("localhost:1", Address("localhost", 1)),
        ("[::1]:8000", Address("::1", 8000)),
        ("0.0.0.0:80", Address("0.0.0.0", 80)),
        ("off", None),
    ],
)
def test_parse_address(text: str, want: Address | None) -> None:
    assert parse_address(text, "--http") == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1:80", "brackets"),
        (":80", "give the host"),
        ("h:99999", "0 to 65535"),
        ("h:x", "number"),
        ("h:\u00b2", "number"),  # '²': str.isdigit() takes it, int() does not
        ("h:\u0661\u0662", "number"),  # Arabic-Indic 12: int() would take it
        ("[::1]", "[IPv6]"),
    ],
)
def test_bad_addresses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_address(text, "--http")


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("*")
    if os.path.exists("/proc/net/if_inet6"):
        assert is_loopback("::1") and not is_loopback("::")
    with pytest.raises(UsageError, match="does not resolve"):
        is_loopback("no-such-host.invalid")


def test_http_off_loopback_needs_a_token_or_insecure() -> None:
    check_http(Address("127.0.0.1", 0), "--http", token=None, insecure=False)
    with pytest.raises(UsageError, match=r"--http 0\.0\.0\.0:80 is reachable from other machines.*--insecure"):
        check_http(Address("0.0.0.0", 80), "--http", token=None, insecure=False)
    check_http(Address("0.0.0.0", 80), "--http", token=TOKEN, insecure=False)
    check_http(Address("0.0.0.0", 80), "--http", token=None, insecure=True)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555", "tcp://[::]:5555"])
def test_zmq_off_loopback_needs_curve_or_insecure(endpoint: str) -> None:
    with pytest.raises(UsageError, match="CURVE keys"):
        check_zmq(endpoint, curve_secret_key=None, insecure=False)
    check_zmq(endpoint, curve_secret_key=b"k" * 40, insecure=False)
    check_zmq(endpoint, curve_secret_key=None, insecure=True)


def test_zmq_endpoints() -> None:
    check_zmq("tcp://127.0.0.1:0", curve_secret_key=None, insecure=False)
    check_zmq("tcp://localhost:7", curve_secret_key=None, insecure=False)
    check_zmq("ipc:///tmp/x/pool.sock", curve_secret_key=None, insecure=False)
    for bad in ("udp://1.2.3.4:5", "tcp://1.2.3.4", "ipc://", "inproc://x", "tcp://127.0.0.1:\u00b2"):
        with pytest.raises(UsageError, match=r"expected|give the socket"):
            check_zmq(bad, curve_secret_key=None, insecure=False)  # names what it expects


def test_ipc_directories_must_be_private(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "dir"
    prepare_ipc(f"ipc://{fresh}/pool.sock", insecure=False)
    assert (fresh.stat().st_mode & 0o777) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(UsageError, match="open to other users"):
        prepare_ipc(f"ipc://{open_dir}/pool.sock", insecure=False)
    prepare_ipc(f"ipc://{open_dir}/pool.sock", insecure=True)
    with pytest.raises(UsageError, match="abstract socket"):
        prepare_ipc("ipc://@pool", insecure=False)
    prepare_ipc("ipc://*", insecure=False)


def test_tokens(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN.decode() + "\n")
    assert read_token(str(f), {}) == TOKEN
    assert read_token(None, {"LIBTORCHRT_HTTP_TOKEN": TOKEN.decode()}) == TOKEN
    assert read_token(None, {}) is None
    f.write_text("short")
    with pytest.raises(UsageError, match="at least 16 characters"):
        read_token(str(f), {})
    with pytest.raises(UsageError, match="cannot read"):
        read_token(str(tmp_path / "missing"), {})


def test_curve_keys(tmp_path: Path) -> None:
    public, secret = zmq.auth.create_certificates(str(tmp_path), "server")
    _, key = zmq.auth.load_certificate(secret)
    assert read_curve_secret_key(secret) == key  # a ZeroMQ secret certificate
    plain = tmp_path / "plain"
    plain.write_text(key.decode() + "\n")
    assert read_curve_secret_key(str(plain)) == key  # the Z85 text alone
    assert read_curve_secret_key(None) is None
    with pytest.raises(UsageError, match="Z85 secret key"):
        read_curve_secret_key(public)  # a public certificate holds no secret key


def _call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": headers}
    asyncio.run(BearerAuth(inner, TOKEN, frozenset({"/v2/health/live"}))(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def test_bearer_auth() -> None:
    assert _call(None, "/v2", [(b"authorization", b"Bearer " + TOKEN)])[0] == 200
    assert _call(None, "/v2", [(b"authorization", b"bearer  " + TOKEN)])[0] == 200
    assert _call(None, "/v2/health/live", [])[0] == 200
    for headers in ([], [(b"authorization", b"Bearer nope")], [(b"authorization", b"Basic " + TOKEN)]):
        status, got, body = _call(None, "/v2", headers)
        assert status == 401 and got[b"www-authenticate"].startswith(b"Bearer")
        assert "bearer token" in json.loads(body)["error"]
