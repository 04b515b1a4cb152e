"""``libtorchrt-pool`` / ``python -m libtorchrt.pool``: the command line (server process).

Parses and checks the options -- addresses, tokens, keys, and the rule that an
endpoint reachable from other machines needs authentication or ``--insecure`` --
before anything is loaded, sets up the log (text or JSON lines on stderr), then runs
the server (``service.py``). tritonserver's spellings of the options that mean the same
here (``--http-port``, ``--exit-on-error``, ...) are accepted as aliases; those that
ask for what this server does not do (gRPC, model control) are refused, naming why.
docs/server.md describes every option.
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
from .http import Limits
from .security import (
    UsageError,
    check_http,
    check_zmq,
    parse_address,
    prepare_ipc,
    read_curve_secret_key,
    read_token,
)
from .service import Options, serve

__all__ = ["JsonFormatter", "build_parser", "log_level", "main", "options_from"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
#: the defaults of --http and --metrics (tritonserver's ports, on loopback)
HTTP_DEFAULT = "127.0.0.1:8000"
METRICS_DEFAULT = "127.0.0.1:8002"
#: tritonserver's boolean option values (it reads them case-insensitively)
_BOOLEANS = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}

DESCRIPTION = """\
Serve the PyTorch models (TorchScript, AOTInductor packages, exported programs, model.py)
of a Triton-style model repository from one worker process
per model instance, over HTTP (the KServe v2 / Open Inference Protocol, which
tritonclient.http speaks), optionally over ZeroMQ (libtorchrt.Client), with Prometheus
metrics. Start-up progress goes to stderr (live on a terminal, log lines otherwise); the
endpoints are printed on stdout once every model is loaded. SIGTERM or SIGINT drains
requests in flight and exits with status 0.
"""

EPILOG = """\
addresses:
  ADDR is HOST:PORT, [IPv6]:PORT, or PORT alone (on 127.0.0.1); port 0 picks a free
  port (the banner shows it); 'off' turns the endpoint off. The defaults bind loopback
  only. An HTTP address that other machines can reach needs a bearer token
  (--http-token-file or LIBTORCHRT_HTTP_TOKEN), a ZeroMQ tcp:// endpoint that they can
  reach needs CURVE keys (--zmq-curve-secret-key-file); --insecure waives both. The
  metrics endpoint is read-only and takes no token (Prometheus scrapes it as it is):
  bind it where only your monitoring can reach it.

tritonserver's options:
  --http-port, --metrics-port, --model-control-mode none, --exit-on-error and
  --log-verbose are accepted with the same meaning, except that the ports are bound on
  127.0.0.1 (tritonserver binds 0.0.0.0): write --http 0.0.0.0:PORT, with a token or
  --insecure, to serve other machines. --grpc-port is refused (no gRPC here), and so
  are the model control modes poll and explicit (the repository is read once).

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


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return int(text)


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
        help="require 'Authorization: Bearer <token>' on HTTP requests (the health probes excepted), "
        "the token being FILE's content (at least 16 characters); the environment variable "
        "LIBTORCHRT_HTTP_TOKEN may hold it instead. Tokens are never taken on the command line, which "
        "every local user can read",
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
        help="HTTP inference requests handled at once, counted once their body has arrived; more get 503 with "
        "Retry-After (default: %(default)s)",
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
        type=int,
        default=0,
        metavar="US",
        help="workers poll this long before they sleep: lower latency for short models, more CPU (default: 0)",
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
    tr.add_argument("--grpc-port", metavar="PORT", help="refused: this server does not serve gRPC")
    tr.add_argument(
        "--model-control-mode",
        type=str.lower,
        choices=["none", "poll", "explicit"],
        metavar="MODE",
        help="'none' only: the repository is read once, at start (poll and explicit are refused)",
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
    """The address ``--http``/``--metrics`` names, or its tritonserver alias does."""
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
    if args.grpc_port is not None:
        raise UsageError(
            f"--grpc-port {args.grpc_port}: this server does not serve gRPC; tritonclient.grpc cannot reach it. "
            "Use HTTP (--http-port, tritonclient.http; the same KServe v2 protocol) and remove --grpc-port"
        )
    if args.model_control_mode not in (None, "none"):
        raise UsageError(
            f"--model-control-mode {args.model_control_mode} is not supported: the repository is read once, at "
            "start, and models are not loaded or unloaded while serving; use --model-control-mode none (the "
            "default) and restart the server to change its models"
        )
    if args.exit_on_error is False and args.strict:
        raise UsageError("--strict and --exit-on-error=false contradict each other; give one")
    http = parse_address(_address(args, "http", "http_port", HTTP_DEFAULT), "--http")
    metrics = parse_address(_address(args, "metrics", "metrics_port", METRICS_DEFAULT), "--metrics")
    if http is None and args.zmq is None:
        raise UsageError("--http off leaves no way to reach the models; give --zmq, or an --http address")
    token = read_token(args.http_token_file)
    if token is not None and http is None:
        raise UsageError("--http-token-file: there is no HTTP endpoint to protect")
    curve = read_curve_secret_key(args.zmq_curve_secret_key_file)
    if curve is not None and args.zmq is None:
        raise UsageError("--zmq-curve-secret-key-file needs --zmq")
    if http is not None:
        check_http(http, "--http", token=token, insecure=args.insecure)
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
        access_log=log_level(args) == "debug",
        log_format=args.log_format,
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
