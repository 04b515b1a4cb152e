"""``libtorchrt-pool`` / ``python -m libtorchrt.pool``: the command line (server process).

Parses and checks the options -- addresses, tokens, keys, and the rule that an
endpoint reachable from other machines needs authentication or ``--insecure`` --
before anything is loaded, then runs the server (``service.py``). docs/server.md
describes every option.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

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

__all__ = ["build_parser", "main", "options_from"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

DESCRIPTION = """\
Serve the TorchScript models of a Triton-style model repository from one worker process
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
        default="127.0.0.1:8000",
        metavar="ADDR",
        help="serve the KServe v2 protocol over HTTP on ADDR (default: %(default)s; 'off': no HTTP)",
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
        default="127.0.0.1:8002",
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics, read-only and without a token "
        "(default: %(default)s; 'off': none)",
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
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what the log (stderr) shows; 'debug' adds an access log line per HTTP request (default: %(default)s)",
    )
    p.add_argument("--version", action="version", version=f"libtorchrt-pool {__version__}")
    return p


def options_from(args: argparse.Namespace) -> Options:
    """Check the parsed arguments and read the token and keys.

    Raises:
        UsageError: a bad address, or an endpoint open to other machines without
            authentication or ``--insecure``.
    """
    http = parse_address(args.http, "--http")
    metrics = parse_address(args.metrics, "--metrics")
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
        strict=args.strict,
        start_timeout=args.start_timeout,
        execution_timeout=args.execution_timeout,
        grace=args.grace,
        limits=Limits(
            max_request_bytes=args.max_request_bytes,
            max_inflight=args.max_inflight,
            body_timeout=args.body_timeout,
            max_json_response_bytes=args.max_json_response_bytes,
        ),
        busy_poll_us=args.busy_poll_us,
        access_log=args.log_level == "debug",
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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    warnings.showwarning = _log_warning  # the pool's start-up notes are RuntimeWarnings
    if level != "debug":  # uvicorn's own start/stop lines repeat ours
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``libtorchrt-pool`` with ``argv`` (default: the command line).

    Returns:
        The exit status (see ``--help``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        options = options_from(args)
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
