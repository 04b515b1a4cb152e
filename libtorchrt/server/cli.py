"""``libtorchrt-pool`` / ``python -m libtorchrt.pool``: the command line (server process).

Parses and checks the options -- addresses, tokens, keys, and the rule that an
endpoint reachable from other machines needs authentication or ``--insecure`` --
before anything is loaded, sets up the log (text or JSON lines on stderr), then runs
the server (``service.py``). tritonserver's spellings of the options that mean the same
here (``--http-port``, ``--grpc-port``, ``--exit-on-error``, ...) are accepted as
aliases, and so are its model control options (``--model-control-mode``,
``--load-model``, ``--repository-poll-secs``: ``control.py``); those that ask for what
this server does not do are refused, naming why. docs/server.md describes every option.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType

from .. import __version__
from ..cpus import parse as parse_cpus
from ..transport.lanes import MAX_AWAKE, MAX_SPIN_US
from .control import DEFAULT_POLL_SECS
from .http import Limits
from .security import (
    UsageError,
    check_http,
    check_zmq,
    parse_address,
    prepare_ipc,
    read_curve_secret_key,
    read_tls_files,
    read_token,
)
from .service import Options, serve

__all__ = ["JsonFormatter", "build_parser", "log_level", "main", "options_from"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
#: the defaults of --http, --grpc and --metrics (tritonserver's ports, on loopback)
HTTP_DEFAULT = "127.0.0.1:8000"
GRPC_DEFAULT = "127.0.0.1:8001"
METRICS_DEFAULT = "127.0.0.1:8002"
#: tritonserver's boolean option values (it reads them case-insensitively)
_BOOLEANS = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}

DESCRIPTION = """\
Serve the PyTorch models (TorchScript, AOTInductor packages, exported programs, model.py)
of a Triton-style model repository from one worker process per model instance, over
HTTP and gRPC (the KServe v2 / Open Inference Protocol, which tritonclient.http and
tritonclient.grpc speak), optionally over ZeroMQ (libtorchrt.Client), with Prometheus
metrics. Start-up progress goes to stderr (live on a terminal, log lines otherwise); the
endpoints are printed on stdout once every model is loaded. SIGTERM or SIGINT drains
requests in flight and exits with status 0.
"""

EPILOG = """\
addresses:
  ADDR is HOST:PORT, [IPv6]:PORT, or PORT alone (on 127.0.0.1); port 0 picks a free
  port (the banner shows it); 'off' turns the endpoint off. The defaults bind loopback
  only. An HTTP or gRPC address that other machines can reach needs a bearer token
  (--http-token-file or LIBTORCHRT_HTTP_TOKEN; TLS does not replace it), a ZeroMQ
  tcp:// endpoint that they can reach needs CURVE keys (--zmq-curve-secret-key-file);
  --insecure waives both. The
  metrics endpoint is read-only and takes no token (Prometheus scrapes it as it is):
  bind it where only your monitoring can reach it.

tritonserver's options:
  --http-port, --grpc-port, --metrics-port, --exit-on-error and --log-verbose are
  accepted with the same meaning, except that the ports are bound on 127.0.0.1
  (tritonserver binds 0.0.0.0): write --http 0.0.0.0:PORT (--grpc 0.0.0.0:PORT), with
  a token or --insecure, to serve other machines.

model control (tritonserver's):
  --model-control-mode none (the default): every model of the repository is loaded at
  start, and the repository is read once. explicit: the models named by --load-model
  (repeat it; '*': all) are loaded at start, and the others are loaded and unloaded by
  request (POST /v2/repository/models/NAME/load, .../unload; tritonclient's
  load_model and unload_model). poll: every model is loaded at start, then the
  repository is looked at every --repository-poll-secs seconds (default 15): a model
  added is loaded, one removed is unloaded, one whose files changed is loaded anew.
  A model loaded anew serves as before until its new workers are ready: no request
  is dropped.

exit status:
  0 stopped by SIGTERM/SIGINT; 1 a port is taken, or no model could be loaded (or,
  with --strict, one could not); 2 a bad command line.

See docs/server.md for the endpoints, errors, metrics and security, and
docs/deployment.md for Kubernetes / KServe.
"""


def _size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 67108864, 64MiB, 512k)")
    value = int(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]]
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:  # (NaN too)
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)


def _boolean(text: str) -> bool:
    value = _BOOLEANS.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):  # (NaN too)
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return int(text)


def _count_up_to(limit: int) -> Callable[[str], int]:
    """A whole number from 0 to ``limit``."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or int(text) > limit:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to {limit}")
        return int(text)

    return parse


def front_cpus(text: str) -> int | tuple[int, ...]:
    """``--front-cpus``: a number of CPUs or a CPU list (``libtorchrt.cpus.parse``)."""
    try:
        return parse_cpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its ``--help`` documents every option)."""
    p = argparse.ArgumentParser(
        prog="libtorchrt-pool",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-repository",
        required=True,
        metavar="DIR",
        help="the model repository: <DIR>/<model>/config.pbtxt and <DIR>/<model>/<version>/model.pt",
    )
    ep = p.add_argument_group("endpoints")
    ep.add_argument(
        "--http",
        default=None,
        metavar="ADDR",
        help=f"serve the KServe v2 protocol over HTTP on ADDR (default: {HTTP_DEFAULT}; 'off': no HTTP)",
    )
    ep.add_argument(
        "--grpc",
        default=None,
        metavar="ADDR",
        help="serve the KServe v2 / Triton protocol over gRPC (tritonclient.grpc) on ADDR "
        f"(default: {GRPC_DEFAULT}; 'off': no gRPC)",
    )
    ep.add_argument(
        "--zmq",
        default=None,
        metavar="ENDPOINT",
        help="also serve libtorchrt.Client over ZeroMQ: tcp://HOST:PORT, or ipc:///PATH (a socket of mode 0600 "
        "in a directory of mode 0700, created if missing); default: off",
    )
    ep.add_argument(
        "--metrics",
        default=None,
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics, read-only and without a token "
        f"(default: {METRICS_DEFAULT}; 'off': none)",
    )
    sec = p.add_argument_group("security")
    sec.add_argument(
        "--http-token-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <token>' on HTTP requests and gRPC calls (the health probes "
        "excepted), the token being FILE's content (at least 16 characters); the environment variable "
        "LIBTORCHRT_HTTP_TOKEN may hold it instead. Tokens are never taken on the command line, which "
        "every local user can read",
    )
    sec.add_argument(
        "--grpc-tls-cert",
        metavar="FILE",
        help="serve gRPC over TLS: FILE is the server's PEM certificate chain (with --grpc-tls-key)",
    )
    sec.add_argument(
        "--grpc-tls-key",
        metavar="FILE",
        help="the PEM private key of --grpc-tls-cert",
    )
    sec.add_argument(
        "--zmq-curve-secret-key-file",
        metavar="FILE",
        help="encrypt and authenticate the ZeroMQ endpoint with CURVE: FILE holds the server's secret key "
        "(Z85, or a ZeroMQ secret certificate from zmq.auth.create_certificates); clients need its "
        "public key, which the banner prints",
    )
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="allow endpoints reachable from other machines without a token or CURVE keys (and an ipc:// "
        "socket in a directory others can enter): anyone who can connect can run the models",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-request-bytes",
        type=_size,
        default=Limits().max_request_bytes,
        metavar="SIZE",
        help="the largest request body (after decompression; checked against Content-Length before it is "
        "read); larger ones get 413 (default: 64MiB)",
    )
    lim.add_argument(
        "--max-inflight",
        type=_positive(int),
        default=Limits().max_inflight,
        metavar="N",
        help="inference requests handled at once, HTTP and gRPC together, counted once their body has arrived; "
        "more get 503 with Retry-After (gRPC: RESOURCE_EXHAUSTED) (default: %(default)s)",
    )
    lim.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=Limits().body_timeout,
        metavar="SECONDS",
        help="how long an HTTP request body may take to arrive, all of it; a slower one gets 408 and its "
        "connection is closed (default: %(default)g)",
    )
    lim.add_argument(
        "--max-json-response-bytes",
        type=_size,
        default=Limits().max_json_response_bytes,
        metavar="SIZE",
        help="the most tensor data an HTTP response returns as JSON; more gets 400 asking for the outputs as "
        "binary data (binary outputs are not limited) (default: 4MiB)",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if any model cannot be loaded (default: serve the others; the failed ones "
        "are listed, and answer 503)",
    )
    run.add_argument(
        "--start-timeout",
        type=_positive(float),
        default=120.0,
        metavar="SECONDS",
        help="how long a worker may take to load and warm up its model (default: %(default)s)",
    )
    run.add_argument(
        "--execution-timeout",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="how long one execution may take, for models that set no EXECUTION_TIMEOUT parameter; a longer "
        "one fails with 504 and its worker is killed and replaced (default: no limit)",
    )
    run.add_argument(
        "--start-method",
        default="forkserver",
        choices=["forkserver", "spawn"],
        help="how worker processes start: forked from a template process that imported torch once (fast), "
        "or each a fresh interpreter (default: %(default)s; see docs/startup.md)",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long requests in flight may take to finish (default: %(default)s)",
    )
    run.add_argument(
        "--busy-poll-us",
        type=_count_up_to(MAX_SPIN_US),
        default=0,
        metavar="US",
        help="workers, and a caller waiting on the pool's only request in flight, poll this long before they "
        "sleep: lower latency for short models, more CPU (default: 0)",
    )
    run.add_argument(
        "--wake-limit",
        type=_count_up_to(MAX_AWAKE),
        default=2,
        metavar="N",
        help="caller threads one batch's replies wake at once at most; 0: all (default: %(default)s)",
    )
    run.add_argument(
        "--front-cpus",
        type=front_cpus,
        default=None,
        metavar="N|LIST",
        help="keep the server's threads on N CPUs (the lowest-numbered), or on a CPU list such as 0,2 or 0-1, "
        "and the workers on the others (Pool(front_cpus=)); default: the kernel places them",
    )
    run.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="what the log (stderr) shows; 'debug' adds an access log line per HTTP request (default: info)",
    )
    run.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="the log's form: 'text' lines, or 'json': one JSON object per line (time, level, logger, message, "
        "and exception when there is one), and no live display of the start-up (default: %(default)s)",
    )
    tr = p.add_argument_group("tritonserver's spellings (see below)")
    tr.add_argument(
        "--http-port", type=_port, metavar="PORT", help="--http 127.0.0.1:PORT (to serve other machines: --http)"
    )
    tr.add_argument("--metrics-port", type=_port, metavar="PORT", help="--metrics 127.0.0.1:PORT")
    tr.add_argument(
        "--grpc-port", type=_port, metavar="PORT", help="--grpc 127.0.0.1:PORT (to serve other machines: --grpc)"
    )
    tr.add_argument(
        "--model-control-mode",
        type=str.lower,
        choices=["none", "poll", "explicit"],
        metavar="MODE",
        help="'none' (default): every model is loaded at start, once; 'explicit': those of --load-model, and "
        "others by request; 'poll': every model, and the repository's changes are applied as they come "
        "(see below)",
    )
    tr.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start (repeat it; '*': every model)",
    )
    tr.add_argument(
        "--repository-poll-secs",
        type=_seconds,
        default=DEFAULT_POLL_SECS,
        metavar="SECONDS",
        help="with --model-control-mode poll: seconds between two looks at the repository (default: %(default)g; "
        "0: never)",
    )
    tr.add_argument(
        "--exit-on-error",
        type=_boolean,
        metavar="BOOL",
        help="true: --strict; false: serve the models that load (this server's default, unlike tritonserver's)",
    )
    tr.add_argument("--log-verbose", type=_count, metavar="N", help="1 or more: --log-level debug; 0: no change")
    p.add_argument("--version", action="version", version=f"libtorchrt-pool {__version__}")
    return p


def _address(args: argparse.Namespace, option: str, port_option: str, default: str) -> str:
    """The address ``--http``/``--grpc``/``--metrics`` names, or its tritonserver alias does."""
    given: str | None = getattr(args, option)
    port: int | None = getattr(args, port_option)
    if port is None:
        return default if given is None else given
    if given is not None:
        raise UsageError(f"--{option} and --{port_option.replace('_', '-')} both name the address; give one")
    return f"127.0.0.1:{port}"


def log_level(args: argparse.Namespace) -> str:
    """The log level ``--log-level`` or ``--log-verbose`` asks for (default ``info``).

    Raises:
        UsageError: the two disagree.
    """
    verbose = args.log_verbose is not None and args.log_verbose > 0
    if args.log_level is not None and verbose and args.log_level != "debug":
        raise UsageError(f"--log-verbose {args.log_verbose} asks for --log-level debug, not {args.log_level}")
    return "debug" if verbose else args.log_level or "info"


def options_from(args: argparse.Namespace) -> Options:
    """Check the parsed arguments and read the token and keys.

    Raises:
        UsageError: a bad address, or an endpoint open to other machines without
            authentication or ``--insecure``.
    """
    mode = args.model_control_mode or "none"
    if args.load_model and mode != "explicit":
        raise UsageError(
            f"--load-model {args.load_model[0]}: --model-control-mode {mode} loads every model at start; "
            "--load-model chooses them with --model-control-mode explicit"
        )
    if "*" in args.load_model and len(args.load_model) > 1:
        raise UsageError("--load-model '*' loads every model: give it alone, not with model names")
    if args.exit_on_error is False and args.strict:
        raise UsageError("--strict and --exit-on-error=false contradict each other; give one")
    http = parse_address(_address(args, "http", "http_port", HTTP_DEFAULT), "--http")
    grpc = parse_address(_address(args, "grpc", "grpc_port", GRPC_DEFAULT), "--grpc")
    metrics = parse_address(_address(args, "metrics", "metrics_port", METRICS_DEFAULT), "--metrics")
    if http is None and grpc is None and args.zmq is None:
        raise UsageError("--http off and --grpc off leave no way to reach the models; give --zmq, or an address")
    token = read_token(args.http_token_file)
    if token is not None and http is None and grpc is None:
        raise UsageError("--http-token-file: there is no HTTP or gRPC endpoint to protect")
    grpc_tls = read_tls_files(args.grpc_tls_cert, args.grpc_tls_key)
    if grpc_tls is not None and grpc is None:
        raise UsageError("--grpc-tls-cert and --grpc-tls-key need a gRPC endpoint (--grpc is off)")
    curve = read_curve_secret_key(args.zmq_curve_secret_key_file)
    if curve is not None and args.zmq is None:
        raise UsageError("--zmq-curve-secret-key-file needs --zmq")
    if http is not None:
        check_http(http, "--http", token=token, insecure=args.insecure)
    if grpc is not None:  # (TLS encrypts; it does not say who may call: the token does)
        check_http(grpc, "--grpc", token=token, insecure=args.insecure)
    if args.zmq is not None:
        check_zmq(args.zmq, curve_secret_key=curve, insecure=args.insecure)
        prepare_ipc(args.zmq, insecure=args.insecure)
    if not os.path.isdir(args.model_repository):
        raise UsageError(f"--model-repository {args.model_repository!r} is not a directory")
    if args.grace < 0:
        raise UsageError("--grace must be >= 0")
    return Options(
        repository=args.model_repository,
        http=http,
        metrics=metrics,
        zmq=args.zmq,
        token=token,
        curve_secret_key=curve,
        insecure=args.insecure,
        strict=args.strict or bool(args.exit_on_error),
        start_timeout=args.start_timeout,
        execution_timeout=args.execution_timeout,
        start_method=args.start_method,
        grace=args.grace,
        limits=Limits(
            max_request_bytes=args.max_request_bytes,
            max_inflight=args.max_inflight,
            body_timeout=args.body_timeout,
            max_json_response_bytes=args.max_json_response_bytes,
        ),
        busy_poll_us=args.busy_poll_us,
        wake_limit=args.wake_limit,
        front_cpus=args.front_cpus,
        access_log=log_level(args) == "debug",
        log_format=args.log_format,
        model_control=mode,
        load_models=tuple(args.load_model),
        poll_secs=args.repository_poll_secs,
        grpc=grpc,
        grpc_tls=grpc_tls,
    )


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    logging.getLogger("libtorchrt").warning("%s", message)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, and ``exception`` (its traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("libtorchrt").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("libtorchrt").critical(
        "uncaught exception in thread %s", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )  # fmt: skip


def _setup_logging(level: str, form: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    warnings.showwarning = _log_warning  # the pool's start-up notes are RuntimeWarnings
    # What escapes a thread goes to the log too, as one record (and as JSON when asked),
    # not to stderr as Python's bare last-resort print.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    if level != "debug":  # uvicorn's own start/stop lines repeat ours
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``libtorchrt-pool`` with ``argv`` (default: the command line).

    Returns:
        The exit status (see ``--help``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = log_level(args)
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    _setup_logging(level, args.log_format)
    try:
        options = options_from(args)
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
