"""Callers of a running server: KServe v2 over HTTP or gRPC, or ``libtorchrt.Client`` (bench process).

The sweep measures these as it measures a pool it started (``serving.Server``); what
changes is the way in:

* :class:`HttpServer` -- KServe v2 with the binary tensor data extension both ways.
  The default client is a small one of the bench's own on ``http.client`` (one
  keep-alive connection per caller thread, kept in an idle list between requests):
  per request it encodes the JSON header, sends the tensors' bytes from their own
  memory, reads the answer into one buffer and views the outputs in it -- what a lean
  application does, close to what perf_analyzer's C++ client costs.
  ``http_client="tritonclient"`` uses ``tritonclient.http`` instead (one
  ``InferenceServerClient`` per connection), to see what that client adds;
* :class:`GrpcServer` -- KServe v2 / Triton over gRPC through ``tritonclient.grpc``:
  one ``InferenceServerClient`` (one channel) shared by the caller threads, as its
  unary calls are thread-safe; tensors travel as raw contents both ways;
* :class:`ZmqServer` -- one :class:`libtorchrt.Client` shared by the caller threads (it
  is thread-safe), with the defaults an application gets: shared memory on the same
  host, frames otherwise.

Either way the latency of a request includes the client's own work (encoding,
copying, decoding, reading the outputs): it runs in the caller threads, in this
process, on the same CPUs as the server when both run on one machine.

Failed requests are counted by kind, as the load generator counts exceptions:
``HTTP 503``, ``gRPC UNAVAILABLE``, ``TimeoutError``, ``ConnectionRefusedError``, or
the libtorchrt error the server raised (``Client`` raises them again with their own
types).
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import importlib
import json
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import torch

from libtorchrt import Client
from libtorchrt.transport.dtypes import TABLE

from .endpoint import Endpoint, grpc_code, grpc_headers, grpc_message, http_token, tritonclient_grpc
from .serving import InputFeed, Server, consume
from .source import SourceError

__all__ = ["HTTP_CLIENTS", "KSERVE_DTYPES", "GrpcError", "GrpcServer", "HttpError", "HttpServer", "ZmqServer"]

#: ``--http-client`` values.
HTTP_CLIENTS: tuple[str, ...] = ("stdlib", "tritonclient")

#: torch dtype -> KServe data type (binary: little-endian, as the protocol says).
KSERVE_DTYPES: dict[torch.dtype, str] = {d.torch: d.kserve for d in TABLE if d.torch is not None and d.kserve}
_TORCH_DTYPES = {v: k for k, v in KSERVE_DTYPES.items()}
#: A reused connection the server closed while idle fails at once: such a request is
#: sent again, once, on a new connection (the server never saw it).
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class HttpError(RuntimeError):
    """The server answered an inference request with an error status.

    Attributes:
        status: the HTTP status; the load generator counts the request as ``HTTP <status>``.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.error_name = f"HTTP {status}"


class GrpcError(RuntimeError):
    """The server answered an inference request with a gRPC error status.

    Attributes:
        code: the status (``UNAVAILABLE``); the load generator counts the request as
            ``gRPC <code>``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"gRPC {code}: {message}")
        self.code = code
        self.error_name = f"gRPC {code}"


def _error_message(body: bytes | bytearray) -> str:
    try:
        doc = json.loads(body)
        return str(doc["error"]) if isinstance(doc, dict) and "error" in doc else bytes(body[:300]).decode()
    except (ValueError, UnicodeDecodeError):
        return repr(bytes(body[:300]))


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without copying a contiguous CPU tensor."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


class HttpServer(Server):
    """A KServe v2 HTTP server, driven by the bench's own client or tritonclient.

    Args:
        endpoint: the server's HTTP address.
        model: the model's name.
        request_timeout: every request's deadline (sent as the ``timeout`` parameter, and
            the socket's timeout a second later).
        http_client: ``"stdlib"`` or ``"tritonclient"``.

    Raises:
        SourceError: tritonclient was asked for and is not installed.
    """

    def __init__(self, endpoint: Endpoint, model: str, request_timeout: float, http_client: str = "stdlib") -> None:
        if http_client not in HTTP_CLIENTS:
            raise ValueError(f"http_client {http_client!r}: expected one of {HTTP_CLIENTS}")
        self.endpoint = endpoint
        self.model = model
        self.timeout = request_timeout
        self.http_client = http_client
        self.path = f"{endpoint.prefix}/v2/models/{urllib.parse.quote(model, safe='')}/infer"
        self.token = http_token()
        self.notes = []
        self.flags = {}
        # Idle connections, most recently used last (a stale one is rarely taken). deque's
        # append and pop are atomic: the caller threads share it without a lock.
        self._idle: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()  # guards _open and _closed
        self._open: set[Any] = set()  # every connection not yet closed
        self._closed = False
        self._th: Any = None  # tritonclient.http, imported when asked for (a dev dependency)
        self._th_error: Any = None
        if http_client == "tritonclient":
            try:
                self._th = importlib.import_module("tritonclient.http")
                self._th_error = importlib.import_module("tritonclient.utils").InferenceServerException
            except ImportError:
                raise SourceError(
                    "--http-client tritonclient needs tritonclient: pip install 'tritonclient[http]'"
                ) from None

    # ── connections ────────────────────────────────────────────────────────────

    def _connect(self) -> Any:
        ep = self.endpoint
        conn: Any
        if self.http_client == "tritonclient":
            netloc = f"[{ep.host}]" if ":" in ep.host else ep.host
            conn = self._th.InferenceServerClient(
                f"{netloc}:{ep.port}", connection_timeout=self.timeout + 1.0, network_timeout=self.timeout + 1.0
            )
        else:
            conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self.timeout + 1.0)
        with self._lock:
            if self._closed:
                conn.close()
                raise ConnectionAbortedError("the bench closed its HTTP connections")
            self._open.add(conn)
        return conn

    def _discard(self, conn: Any) -> None:
        with self._lock:
            self._open.discard(conn)
        with contextlib.suppress(Exception):
            conn.close()

    def _take(self) -> tuple[Any, bool]:
        """An idle connection (reused: True), or a new one."""
        try:
            return self._idle.pop(), True
        except IndexError:
            return self._connect(), False

    # ── the bench's own client ─────────────────────────────────────────────────

    def _send(self, conn: http.client.HTTPConnection, inputs: Mapping[str, torch.Tensor]) -> http.client.HTTPResponse:
        buffers = []
        entries = []
        for name, t in inputs.items():
            raw = _raw(t)
            buffers.append(raw)
            entries.append(
                {
                    "name": name,
                    "shape": list(t.shape),
                    "datatype": KSERVE_DTYPES[t.dtype],
                    "parameters": {"binary_data_size": raw.nbytes},
                }
            )
        params = {"binary_data_output": True, "timeout": int(self.timeout * 1e6)}
        header = json.dumps({"inputs": entries, "parameters": params}).encode()
        conn.putrequest("POST", self.path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(len(header) + sum(b.nbytes for b in buffers)))
        conn.putheader("Inference-Header-Content-Length", str(len(header)))
        if self.token:
            conn.putheader("Authorization", f"Bearer {self.token}")
        conn.endheaders(header)  # the request line, the headers and the JSON header: one write
        for b in buffers:
            conn.send(b)  # from the tensor's memory
        return conn.getresponse()

    @staticmethod
    def _read(response: http.client.HTTPResponse) -> bytearray:
        """The whole body, in a buffer of its own (writable: outputs are views of it)."""
        length = response.length
        if length is None:
            return bytearray(response.read())
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(body[:got]), length - got)
            got += n
        return body

    @staticmethod
    def _outputs(response: http.client.HTTPResponse, body: bytearray) -> dict[str, torch.Tensor]:
        """The outputs, viewed in the body (binary data extension)."""
        header_length = response.getheader("Inference-Header-Content-Length")
        if header_length is None:  # all JSON: no output asked for binary was returned
            doc = json.loads(body)
            return {o["name"]: torch.tensor(o["data"]) for o in doc.get("outputs", [])}
        n = int(header_length)
        doc = json.loads(body[:n])
        out = {}
        offset = n
        for o in doc.get("outputs", []):
            size = int(o.get("parameters", {}).get("binary_data_size", 0))
            dtype = _TORCH_DTYPES.get(o["datatype"])
            if dtype is None:  # BYTES: strings need no reading
                offset += size
                continue
            shape = [int(d) for d in o["shape"]]
            count = size // torch.empty((), dtype=dtype).element_size()
            t = (
                torch.frombuffer(body, dtype=dtype, count=count, offset=offset)
                if count
                else torch.empty(0, dtype=dtype)
            )
            out[o["name"]] = t.reshape(shape)
            offset += size
        if offset != len(body):
            raise http.client.HTTPException(f"the answer holds {len(body)} bytes; its header accounts for {offset}")
        return out

    def _stdlib_call(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        conn, reused = self._take()
        try:
            try:
                response = self._send(conn, inputs)
            except _STALE:
                if not reused:
                    raise
                self._discard(conn)
                conn = self._connect()
                response = self._send(conn, inputs)
            body = self._read(response)
            outputs = self._outputs(response, body) if response.status == 200 else None
        except BaseException:
            self._discard(conn)  # in an unknown state: never reused
            raise
        if response.will_close:
            self._discard(conn)
        else:
            self._idle.append(conn)
        if outputs is None:
            raise HttpError(response.status, _error_message(body))
        return outputs

    # ── tritonclient ───────────────────────────────────────────────────────────

    def _tritonclient_call(self, inputs: Mapping[str, torch.Tensor]) -> list[Any]:
        th = self._th
        client, _ = self._take()
        try:
            infer_inputs = []
            for name, t in inputs.items():
                x = th.InferInput(name, list(t.shape), KSERVE_DTYPES[t.dtype])
                x.set_data_from_numpy(t.numpy(), binary_data=True)
                infer_inputs.append(x)
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            try:
                result = client.infer(self.model, infer_inputs, timeout=int(self.timeout * 1e6), headers=headers)
            except self._th_error as exc:
                status = exc.status()
                if status is not None and str(status).isdigit():
                    raise HttpError(int(status), exc.message()) from None
                raise
            response = result.get_response()
            outputs = [result.as_numpy(o["name"]) for o in response.get("outputs", [])]
        except BaseException:
            self._discard(client)
            raise
        self._idle.append(client)
        return outputs

    # ── Server ─────────────────────────────────────────────────────────────────

    def caller(self, feed: InputFeed) -> Callable[[], object]:
        sets, take = feed.sets, feed.take
        send: Callable[[Mapping[str, torch.Tensor]], Any]
        if self.http_client == "tritonclient":
            bad = [t.dtype for s in sets for t in s.values() if t.dtype == torch.bfloat16]
            if bad:
                raise ValueError("tritonclient takes BF16 data as float32 arrays; use --http-client stdlib")
            send = self._tritonclient_call
        else:
            send = self._stdlib_call
        realistic = feed.application(send)
        if realistic is not None:
            return realistic

        def call() -> None:
            consume(send(sets[take()]))

        return call

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), set()
        self._idle.clear()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


class GrpcServer(Server):
    """A KServe v2 / Triton gRPC server, through one ``tritonclient.grpc`` client.

    Args:
        endpoint: the server's gRPC address (``grpc://`` or ``grpcs://``).
        model: the model's name.
        request_timeout: every request's deadline (sent as the ``timeout`` parameter,
            and the call's gRPC deadline a second later).

    Raises:
        SourceError: tritonclient's gRPC client is not installed.
    """

    def __init__(self, endpoint: Endpoint, model: str, request_timeout: float) -> None:
        self.model = model
        self.timeout = request_timeout
        self.notes = []
        self.flags = {}
        self._tc, self._error = tritonclient_grpc()
        self._headers = grpc_headers()
        self.client = self._tc.InferenceServerClient(endpoint.address, ssl=endpoint.tls)

    def _call(self, inputs: Mapping[str, torch.Tensor]) -> list[Any]:
        tc = self._tc
        infer_inputs = []
        for name, t in inputs.items():
            x = tc.InferInput(name, list(t.shape), KSERVE_DTYPES[t.dtype])
            x.set_data_from_numpy(t.numpy())  # raw_input_contents
            infer_inputs.append(x)
        try:
            result = self.client.infer(
                self.model,
                infer_inputs,
                timeout=int(self.timeout * 1e6),
                client_timeout=self.timeout + 1.0,
                headers=self._headers,
            )
        except self._error as exc:
            raise GrpcError(grpc_code(exc), grpc_message(exc)) from None
        return [result.as_numpy(o.name) for o in result.get_response().outputs]

    def caller(self, feed: InputFeed) -> Callable[[], object]:
        sets, take, send = feed.sets, feed.take, self._call
        if any(t.dtype == torch.bfloat16 for s in sets for t in s.values()):
            raise ValueError("tritonclient takes BF16 data as float32 arrays; use the server's HTTP address")
        realistic = feed.application(send)
        if realistic is not None:
            return realistic

        def call() -> None:
            consume(send(sets[take()]))

        return call

    def close(self) -> None:
        self.client.close()  # (idempotent: tritonclient closes its channel)


class ZmqServer(Server):
    """A ``libtorchrt-pool`` ZeroMQ endpoint, through one shared :class:`libtorchrt.Client`.

    Args:
        endpoint: the server's ZeroMQ endpoint.
        model: the model's name.
        request_timeout: every request's deadline.
        connect_timeout: how long to wait for the server's handshake.

    Raises:
        ServerConnectionError, ProtocolError: as ``Client`` raises them.
    """

    def __init__(self, endpoint: Endpoint, model: str, request_timeout: float, connect_timeout: float = 10.0) -> None:
        self.model = model
        self.timeout = request_timeout
        self.client = Client(endpoint.url, timeout=request_timeout, connect_timeout=connect_timeout)
        self.notes = []
        self.flags = {}
        self._restarts = self._count_restarts()

    def _count_restarts(self) -> int:
        health = self.client.health().get(self.model)
        return sum(i.restarts for i in health.instances) if health is not None else 0

    def caller(self, feed: InputFeed) -> Callable[[], object]:
        client, model, timeout, sets, take = self.client, self.model, self.timeout, feed.sets, feed.take
        realistic = feed.application(lambda inputs: client.infer(model, inputs, timeout=timeout))
        if realistic is not None:
            return realistic

        def call() -> None:
            consume(client.infer(model, sets[take()], timeout=timeout))

        return call

    def news(self) -> list[str]:
        with contextlib.suppress(Exception):  # health is informative only
            restarts = self._count_restarts()
            new, self._restarts = restarts - self._restarts, restarts
            if new:
                return [f"{new} worker restart(s) during this row"]
        return []

    def close(self) -> None:
        self.client.close(grace=0.0)
