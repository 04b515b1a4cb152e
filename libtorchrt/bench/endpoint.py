"""``--endpoint URL``: where a running server is, and what it serves (bench process).

:func:`parse_endpoint` reads the URL; :func:`resolve_remote` asks the server about the
model and returns the :class:`~libtorchrt.bench.source.Target` to benchmark:

* ``http://HOST:PORT`` -- KServe v2 over HTTP (``libtorchrt-pool --http``): the inputs'
  names, data types and shapes come from the model's metadata
  (``GET /v2/models/<m>``), ``max_batch_size`` and the instance count from its
  configuration (``GET /v2/models/<m>/config``);
* ``tcp://HOST:PORT``, ``ipc:///PATH`` -- libtorchrt's ZeroMQ protocol
  (``libtorchrt-pool --zmq``), through :class:`libtorchrt.Client`. Its ``models()``
  says whether the model is served and how many instances it has, but the protocol
  carries no input metadata: the inputs come from ``--metadata http://...`` (the same
  server's HTTP address) or from ``--input-shape`` / ``--input-dtype``, as for a
  TorchScript file;
* ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` (TLS) -- KServe v2 / Triton over gRPC
  (``libtorchrt-pool --grpc``), through ``tritonclient.grpc`` (a dev dependency,
  imported only then): the same metadata and configuration as over HTTP, from the
  ``ModelMetadata`` and ``ModelConfig`` RPCs. ``grpcs://`` trusts grpc's default roots,
  or the certificates in the file that grpc's own ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``
  names (a server's self-signed certificate).

``-1`` dims follow the rule of a repository model (``source.declared_inputs``): 1 unless
``--shape-override NAME=...`` gives them. A server that cannot be reached, an unknown
model or one that is not ready are usage errors (:class:`SourceError`, exit 2).
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libtorchrt import ConfigError, ModelConfig, TensorSpec

from .source import InputOptions, SourceError, Target, declared_inputs, given_inputs, variable_dims

__all__ = ["TOKEN_ENV", "Endpoint", "parse_endpoint", "resolve_remote"]

#: The bearer token of a server started with ``--http-token-file`` (the variable the server reads too).
TOKEN_ENV = "LIBTORCHRT_HTTP_TOKEN"
#: The port of ``grpc://HOST`` (libtorchrt-pool's and Triton's default).
GRPC_PORT = 8001
_NAME_IT = "name the model to benchmark (after the URL, or --model NAME)"
_USAGE = (
    "expected http://HOST:PORT (KServe v2 over HTTP), grpc://HOST:PORT (KServe v2 over gRPC) "
    "or tcp://HOST:PORT / ipc:///PATH (libtorchrt's ZeroMQ)"
)


@dataclass(frozen=True)
class Endpoint:
    """A running server's address.

    Attributes:
        url: the URL as the rows report it (``http://host:port[/prefix]``, ``grpc://...``,
            ``tcp://...``).
        protocol: ``"http"`` (KServe v2), ``"grpc"`` (KServe v2 / Triton over gRPC) or
            ``"zmq"`` (``libtorchrt.Client``).
        host, port, prefix: the HTTP or gRPC address, and the path the ``/v2`` routes
            hang under (HTTP).
        tls: gRPC over TLS (``grpcs://``).
    """

    url: str
    protocol: str
    host: str = ""
    port: int = 0
    prefix: str = ""
    tls: bool = False

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 host in brackets), as gRPC and tritonclient take it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(url: str) -> Endpoint:
    """Read ``--endpoint URL``.

    Raises:
        SourceError: not a URL of a protocol libtorchrt-pool serves.
    """
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not rest:
        raise SourceError(f"--endpoint {url!r}: {_USAGE}")
    if scheme in ("tcp", "ipc"):
        if scheme == "tcp" and (":" not in rest or not rest.rsplit(":", 1)[1].isdigit()):
            raise SourceError(f"--endpoint {url!r}: a ZeroMQ TCP endpoint is tcp://HOST:PORT")
        return Endpoint(f"{scheme}://{rest}", "zmq")
    if scheme == "https":
        raise SourceError(
            f"--endpoint {url!r}: libtorchrt-pool serves plain HTTP and the bench speaks plain HTTP only; "
            "measure the server's own address (http://HOST:PORT)"
        )
    if scheme not in ("http", "grpc", "grpcs"):
        raise SourceError(f"--endpoint {url!r}: unknown scheme {scheme!r}; {_USAGE}")
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port or (80 if scheme == "http" else GRPC_PORT)
    except ValueError:
        raise SourceError(f"--endpoint {url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or parts.query or parts.fragment:
        raise SourceError(f"--endpoint {url!r}: {_USAGE}")
    netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if scheme != "http":
        if parts.path.strip("/"):  # gRPC names the service itself: there is no prefix
            raise SourceError(f"--endpoint {url!r}: a gRPC endpoint is {scheme}://HOST:PORT, without a path")
        return Endpoint(f"{scheme}://{netloc}:{port}", "grpc", parts.hostname, port, tls=scheme == "grpcs")
    prefix = parts.path.rstrip("/")
    return Endpoint(f"http://{netloc}:{port}{prefix}", "http", parts.hostname, port, prefix)


def http_token() -> str | None:
    """The bearer token from :data:`TOKEN_ENV`, if set."""
    return os.environ.get(TOKEN_ENV) or None


def grpc_headers() -> dict[str, str] | None:
    """The gRPC metadata that carries :func:`http_token` (``authorization: Bearer ...``), if set."""
    token = http_token()
    return {"authorization": f"Bearer {token}"} if token else None


def tritonclient_grpc() -> tuple[Any, type[Exception]]:
    """``tritonclient.grpc`` and its ``InferenceServerException``, imported when a gRPC
    endpoint is measured (tritonclient is a dev dependency).

    Raises:
        SourceError: tritonclient's gRPC client is not installed.
    """
    try:
        module = importlib.import_module("tritonclient.grpc")
        error: type[Exception] = importlib.import_module("tritonclient.utils").InferenceServerException
    except ImportError:
        raise SourceError("a gRPC --endpoint needs tritonclient: pip install 'tritonclient[grpc]'") from None
    return module, error


def grpc_code(exc: Exception) -> str:
    """The gRPC status of a tritonclient error (``UNAVAILABLE``; it says ``StatusCode.UNAVAILABLE``)."""
    status = getattr(exc, "status", lambda: None)()
    return str(status).removeprefix("StatusCode.") if status else "UNKNOWN"


def grpc_message(exc: Exception) -> str:
    """The message of a tritonclient error, without its status."""
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc)


def _get_json(ep: Endpoint, method: str, path: str, timeout: float) -> tuple[int, Any]:
    """One request for a JSON document: ``(status, document)``.

    Raises:
        SourceError: no server answered, or the answer is not JSON.
    """
    headers = {"Accept": "application/json"}
    token = http_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
    try:
        conn.request(method, ep.prefix + path, body=b"" if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise SourceError(
            f"no server answered at {ep.url} ({type(exc).__name__}: {exc}); "
            "is libtorchrt-pool running with --http at that address?"
        ) from None
    finally:
        conn.close()
    if response.status == 401:
        raise SourceError(f"the server at {ep.url} requires a token: put it in ${TOKEN_ENV}")
    if not body and path.endswith("/ready"):  # readiness is the status alone
        return response.status, None
    try:
        return response.status, json.loads(body)
    except ValueError:
        raise SourceError(
            f"{ep.url}{path} answered HTTP {response.status} with {body[:120]!r}, not JSON; is it a KServe v2 server?"
        ) from None


def _error_text(doc: Any) -> str:
    return str(doc.get("error")) if isinstance(doc, dict) and "error" in doc else json.dumps(doc)[:300]


def _pick_http_model(ep: Endpoint, model: str | None, timeout: float) -> str:
    if model is not None:
        return model
    status, index = _get_json(ep, "POST", "/v2/repository/index", timeout)
    ready = sorted({m["name"] for m in index if m.get("state") == "READY"}) if isinstance(index, list) else []
    if status == 200 and len(ready) == 1:
        return ready[0]
    raise SourceError(
        f"{_NAME_IT}; the server at {ep.url} serves {ready if status == 200 else 'models it did not list'}"
    )


def _instance_count(config: dict[str, Any]) -> int:
    count = 0
    for group in config.get("instance_group") or []:
        gpus = group.get("gpus") or []
        count += int(group.get("count") or 1) * max(1, len(gpus))
    return max(1, count)


def _http_config(ep: Endpoint, model: str | None, timeout: float) -> ModelConfig:
    """The model's configuration as the HTTP server describes it (inputs from its metadata).

    Raises:
        SourceError: unreachable, unknown model, not ready, BYTES inputs.
    """
    name = _pick_http_model(ep, model, timeout)
    quoted = urllib.parse.quote(name, safe="")
    status, meta = _get_json(ep, "GET", f"/v2/models/{quoted}", timeout)
    if status != 200:
        raise SourceError(f"the server at {ep.url} cannot benchmark model {name!r}: {_error_text(meta)}")
    status, config = _get_json(ep, "GET", f"/v2/models/{quoted}/config", timeout)
    if status != 200 or not isinstance(config, dict):
        config = {}  # a KServe server without Triton's configuration extension
    status, _ = _get_json(ep, "GET", f"/v2/models/{quoted}/ready", timeout)
    if status != 200:
        raise SourceError(f"model {name!r} is not ready on the server at {ep.url} (HTTP {status})")
    return _described(ep, name, meta, config)


def _grpc_config(ep: Endpoint, model: str | None, timeout: float) -> ModelConfig:
    """The model's configuration as the gRPC server describes it: the same documents
    as over HTTP, from the ``ModelMetadata`` and ``ModelConfig`` RPCs.

    Raises:
        SourceError: tritonclient missing, unreachable, unknown model, not ready, BYTES inputs.
    """
    module, error = tritonclient_grpc()
    headers = grpc_headers()

    def ask(call: Callable[[], Any], failure: str) -> Any:
        try:
            return call()
        except error as exc:
            if grpc_code(exc) == "UNAUTHENTICATED":
                raise SourceError(f"the server at {ep.url} requires a token: put it in ${TOKEN_ENV}") from None
            raise SourceError(f"{failure}: {grpc_message(exc)}") from None

    client = module.InferenceServerClient(ep.address, ssl=ep.tls)
    try:
        try:  # ServerLive needs no token: its failure means that no gRPC server answered
            client.is_server_live(client_timeout=timeout)
        except error as exc:
            hint = (
                "? A self-signed certificate is trusted once GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names its PEM file"
                if ep.tls
                else " (grpcs:// for one with --grpc-tls-cert)?"
            )
            raise SourceError(
                f"no server answered at {ep.url} ({grpc_code(exc)}: {grpc_message(exc)}); "
                f"is libtorchrt-pool running with --grpc at that address{hint}"
            ) from None
        name = model
        if name is None:
            index = ask(
                lambda: client.get_model_repository_index(headers=headers, as_json=True, client_timeout=timeout),
                f"the server at {ep.url} did not list its models",
            )
            ready = sorted({m["name"] for m in index.get("models", []) if m.get("state") == "READY"})
            if len(ready) != 1:
                raise SourceError(f"{_NAME_IT}; the server at {ep.url} serves {ready}")
            name = ready[0]
        meta = ask(
            lambda: client.get_model_metadata(name, headers=headers, as_json=True, client_timeout=timeout),
            f"the server at {ep.url} cannot benchmark model {name!r}",
        )
        try:
            config = client.get_model_config(name, headers=headers, as_json=True, client_timeout=timeout)["config"]
        except (error, KeyError):
            config = {}  # a KServe server without Triton's configuration RPC
        ready_now = ask(
            lambda: client.is_model_ready(name, headers=headers, client_timeout=timeout),
            f"model {name!r} is not ready on the server at {ep.url}",
        )
        if not ready_now:
            raise SourceError(f"model {name!r} is not ready on the server at {ep.url}")
    finally:
        client.close()
    return _described(ep, name, meta, config)


def _described(ep: Endpoint, name: str, meta: Any, config: dict[str, Any]) -> ModelConfig:
    """The model's configuration from its KServe v2 metadata (inputs) and its Triton
    configuration (``max_batch_size``, instances), as either protocol returns them
    (over gRPC, as JSON, the dims are strings).

    Raises:
        SourceError: BYTES inputs, or documents that cannot be read.
    """
    max_batch_size = int(config.get("max_batch_size") or 0)
    specs = []
    try:
        for entry in meta.get("inputs") or []:
            shape = [int(d) for d in entry["shape"]]
            if str(entry["datatype"]).upper() == "BYTES":
                raise SourceError(
                    f"input {entry['name']!r} of model {name!r} is BYTES (strings): the bench sends tensors"
                )
            dims = shape[1:] if max_batch_size > 0 and shape else shape
            specs.append(TensorSpec(entry["name"], entry["datatype"], dims))
        return ModelConfig(
            name=name,
            path=ep.url,
            instances=_instance_count(config),
            inputs=specs,
            max_batch_size=max_batch_size,
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise SourceError(f"the metadata of model {name!r} at {ep.url} cannot be read: {exc}") from None


def _zmq_status(ep: Endpoint, model: str | None, connect_timeout: float) -> tuple[str, int, bool]:
    """``(model, instances, shared memory)`` from the server's ``models()``.

    Raises:
        SourceError: no server, another protocol version, unknown model, not ready.
    """
    from libtorchrt import Client, TorchRTError

    try:
        with Client(ep.url, connect_timeout=connect_timeout, timeout=connect_timeout) as client:
            statuses = client.models()
            shm = client.shared_memory
    except TorchRTError as exc:
        raise SourceError(f"--endpoint {ep.url}: {exc}") from None
    served = sorted({s.name for s in statuses})
    if model is None:
        ready = sorted({s.name for s in statuses if s.state == "ready"})
        if len(ready) != 1:
            raise SourceError(f"{_NAME_IT}; {ep.url} serves {served}")
        model = ready[0]
    versions = [s for s in statuses if s.name == model]
    if not versions:
        raise SourceError(f"the server at {ep.url} does not serve model {model!r}; it serves {served}")
    latest = max(versions, key=lambda s: s.version or 0)
    if latest.state != "ready":
        why = f": {latest.error}" if latest.error else ""
        raise SourceError(f"model {model!r} is {latest.state} on the server at {ep.url}{why}")
    return model, max(1, latest.instances), shm


def resolve_remote(
    ep: Endpoint,
    *,
    model: str | None,
    options: InputOptions,
    metadata: Endpoint | None = None,
    timeout: float = 10.0,
) -> Target:
    """The model served at ``ep`` and the inputs to send it.

    Args:
        ep: the server (:func:`parse_endpoint`).
        model: the model's name (None: the only one the server serves).
        options: the input options (``--shape-override``, ``--input-shape``, ...).
        metadata: for a ZeroMQ endpoint, the same server's HTTP address to read the
            inputs from.
        timeout: how long to wait for each answer of the server.

    Raises:
        SourceError: the server cannot be reached, does not serve the model, or the
            inputs cannot be made.
    """
    if ep.protocol in ("http", "grpc"):
        if ep.protocol == "http":
            cfg, over = _http_config(ep, model, timeout), "KServe v2 over HTTP"
        else:
            cfg, over = _grpc_config(ep, model, timeout), "KServe v2 over gRPC" + (", TLS" if ep.tls else "")
        specs = declared_inputs(cfg, options)
        return Target(
            cfg,
            specs,
            f"libtorchrt-pool at {ep.url} ({over}), model {cfg.name}",
            endpoint=ep,
            notes=variable_dims(cfg, options),
        )
    name, instances, shm = _zmq_status(ep, model, timeout)
    how = "shared memory" if shm else "ZeroMQ frames"
    source = f"libtorchrt-pool at {ep.url} (libtorchrt.Client, tensors through {how}), model {name}"
    if metadata is not None:
        cfg = _http_config(metadata, name, timeout)
        cfg = ModelConfig(
            name=name, path=ep.url, instances=instances, inputs=cfg.inputs, max_batch_size=cfg.max_batch_size
        )
        specs = declared_inputs(cfg, options)
        return Target(
            cfg, specs, f"{source}; inputs from {metadata.url}", endpoint=ep, notes=variable_dims(cfg, options)
        )
    specs = given_inputs(
        options,
        f"libtorchrt's ZeroMQ protocol does not describe the inputs of model {name!r}: give each input's shape "
        "(--input-shape NAME=d0,d1,... and --input-dtype NAME=DTYPE, default float32) or read them from "
        "the same server's HTTP metadata (--metadata http://HOST:PORT)",
    )
    cfg = ModelConfig(name=name, path=ep.url, instances=instances)
    return Target(cfg, specs, source, endpoint=ep)
