"""The pool server's lifetime: listen, load, serve, drain (server process: the main
thread, and the serving thread that runs the event loop).

::

    main thread                                 serving thread (one event loop)
    ───────────                                 ───────────────────────────────
    bind HTTP/metrics sockets ── a port is taken? exit 1 before loading anything
    start the serving thread ─────────────────► gRPC bound (a taken port: exit 1) and
                                                served; uvicorn for HTTP and metrics:
                                                live 200, ready 400, metrics with each
                                                model's state, inference 503 "loading"
    Pool(repository)          ── progress per model and instance; nothing loaded? exit 1
    ZmqFrontend.start()       ── (with --zmq)
    ServerState.pool = pool   ─────────────────► inference served, ready 200
    print the endpoints; wait for the serving thread
        ... SIGTERM / SIGINT ... ──────────────► drain: new inference requests 503
                                                (gRPC UNAVAILABLE), in-flight ones finish
                                                (up to --grace); ZeroMQ likewise; then the
                                                HTTP and gRPC listeners close
    Pool.close(grace)         ── workers stopped, shared memory and sockets released
    exit 0

The pool loads in the main thread because that is where signals arrive: while it
loads, the one handler raises :class:`Stopped` in the middle of ``Pool()``, which then
closes what it started (a ``Pool()`` running in another thread could not be stopped).
So the event loop runs in a thread of its own, started before the load, and the probes
and metrics answer from the moment the sockets are bound (a Kubernetes liveness probe
does not kill a pod whose models take minutes to load). Once the pool exists, a signal
tells the event loop to drain (``call_soon_threadsafe``) while the main thread waits
for it in ``join``; a second signal while draining stops waiting for HTTP clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn

from .. import __version__
from ..errors import TorchRTError
from ..front.pool import Pool
from ..info import ModelHealth
from ._internals import router_thread, start_pool
from .control import DEFAULT_POLL_SECS, RepositoryControl
from .http import Limits, ServerState, build_app
from .metrics import build_metrics_app
from .progress import Progress
from .security import Address, TlsFiles

__all__ = ["Options", "Stopped", "serve"]

log = logging.getLogger("libtorchrt.server")

#: seconds an idle HTTP connection is kept open
KEEP_ALIVE_S = 75
#: once drained, seconds the gRPC calls still open (idle streams, calls that came as the
#: drain ended and were refused) get before they are cancelled
GRPC_STOP_GRACE_S = 1.0


class Stopped(BaseException):
    """A stop signal arrived while the pool was loading (a BaseException, like
    KeyboardInterrupt, so that nothing on the way swallows it)."""


@dataclass
class Options:
    """What the command line asked for, checked (see ``cli.py``)."""

    repository: str
    http: Address | None
    metrics: Address | None
    zmq: str | None
    token: bytes | None = None
    curve_secret_key: bytes | None = None
    insecure: bool = False
    strict: bool = False
    start_timeout: float = 120.0
    execution_timeout: float | None = None
    #: how workers start (``Pool(start_method=)``)
    start_method: str = "forkserver"
    grace: float = 20.0
    limits: Limits = field(default_factory=Limits)
    busy_poll_us: int = 0
    #: ``Pool(wake_limit=)``
    wake_limit: int = 2
    #: ``Pool(front_cpus=)``: a number of CPUs or their numbers; None: not pinned
    front_cpus: int | tuple[int, ...] | None = None
    access_log: bool = False
    #: ``text`` or ``json`` (``--log-format``): a JSON log gets no live display either
    log_format: str = "text"
    #: ``--model-control-mode``: ``none``, ``explicit`` or ``poll`` (``control.py``)
    model_control: str = "none"
    #: ``--load-model``: with mode explicit, the models loaded at start (``*``: all)
    load_models: tuple[str, ...] = ()
    #: ``--repository-poll-secs``: with mode poll, seconds between two looks at the repository
    poll_secs: float = DEFAULT_POLL_SECS
    #: the gRPC endpoint (``--grpc``); None: no gRPC
    grpc: Address | None = None
    #: serve gRPC over TLS with these (``--grpc-tls-cert``, ``--grpc-tls-key``)
    grpc_tls: TlsFiles | None = None


class _Signals:
    """The process's SIGTERM/SIGINT handler, for every stage of its life."""

    def __init__(self) -> None:
        self.count = 0
        self.raise_now = False
        self.on_signal: Callable[[int], None] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.on_signal is not None:
            self.on_signal(self.count)
        elif self.raise_now:
            log.info("%s: stopping the start", name)
            raise Stopped(name)
        else:
            log.info("%s: already stopping", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _join(thread: threading.Thread) -> None:
    """Wait in the main thread for ``thread`` to end, running signal handlers meanwhile,
    whichever thread caught the signal.

    Linux gives a signal sent to the process to any thread that does not block it
    (grpc's threads, torch's, Python's own); Python then runs its handler in the main
    thread, but only once that thread runs again, which a ``join`` would not: the
    server would never stop. So the main thread waits on a pipe that Python's signal
    handling writes to, from any thread (``signal.set_wakeup_fd``), as does the end of
    ``thread``.
    """
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def ended() -> None:
        thread.join()
        os.write(w, b"\0")

    joiner = threading.Thread(target=ended, name="libtorchrt-join", daemon=True)
    joiner.start()
    try:
        while thread.is_alive():
            select.select([r], [], [])
            os.read(r, 512)  # (back in Python: the handlers run here)
    finally:
        signal.set_wakeup_fd(previous)
    joiner.join()  # (not after an exception: the thread may still run, and the process stops)
    os.close(r)
    os.close(w)


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to the service (it would re-raise them
    after its shutdown, turning a clean stop into death by SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


def _listen(address: Address, option: str) -> socket.socket:
    """A listening socket on ``address``, bound now so that a taken port fails fast.

    Raises:
        OSError: with a message naming the option.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {address} ({option}): {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "; is another server running? choose another port" if e.errno == 98 else ""
        raise OSError(e.errno, f"cannot listen on {address} ({option}): {e.strerror}{hint}") from None
    return sock


def _url(sock: socket.socket, path: str = "") -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


class _Service:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.signals = _Signals()
        self.sockets: dict[str, socket.socket] = {}
        self.pool: Pool | None = None
        self.zmq: Any = None
        #: what the HTTP and metrics applications read: the pool is set once it serves
        self.state = ServerState(None, options.limits)
        #: the repository index, and models loaded and unloaded while serving
        self.control = RepositoryControl(options.repository, options.model_control, options.poll_secs,
                                         options.load_models)  # fmt: skip
        #: what stopped unexpectedly while serving (the exit status is then 1)
        self.broken: str | None = None
        self._stopping = False
        self._watches: list[threading.Thread] = []
        # The serving thread: its event loop, what stops it, uvicorn's servers in it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = asyncio.Event()  # (bound to the loop that first waits on it)
        self._servers: list[_Uvicorn] = []
        #: the gRPC endpoint's server (``grpc_server.GrpcServer``), on the serving thread
        self._grpc: Any = None
        self._listening = threading.Event()
        self._serving_error: BaseException | None = None
        #: a second signal: stop draining now (set on the serving thread's loop)
        self._forced = asyncio.Event()

    # ── stages ─────────────────────────────────────────────────────────────

    def run(self) -> int:
        with self.signals.installed():
            try:
                return self._run()
            except Stopped:  # a signal while the start was failing anyway
                return 0
            finally:
                self.signals.on_signal = None
                self.signals.raise_now = False
                self._close()

    def _run(self) -> int:
        opts = self.options
        # Until the pool exists, a signal stops the start: Stopped, raised in this thread
        # wherever it is (Pool() closes what it started; _close() the rest).
        self.signals.raise_now = True
        try:
            if opts.http is not None:
                self.sockets["http"] = _listen(opts.http, "--http")
            if opts.metrics is not None:
                self.sockets["metrics"] = _listen(opts.metrics, "--metrics")
        except OSError as e:
            log.error("%s", e.strerror)
            return 1
        try:
            if not self._start_serving():
                return 1
            self.pool = self._load()
            self.signals.on_signal = self._on_signal  # from now on a signal drains; it raises no more
        except Stopped:
            return 0
        except (TorchRTError, ValueError, OSError) as e:
            self.signals.raise_now = False
            if opts.strict:
                log.error("a model of %s could not be loaded (--strict): %s", opts.repository, e)
            else:
                log.error("no model could be loaded from %s: %s", opts.repository, e)
            return 1
        finally:
            self.signals.raise_now = False
        if opts.zmq is not None and not self._start_zmq():
            return 1
        self.control.start(self.pool)  # (mode poll: it looks at the repository from now on)
        self.state.control = self.control
        self.state.pool = self.pool  # inference is served from now on, ready answers 200
        self._watch(router_thread(self.pool), "the pool's router thread")
        if self.zmq is not None:
            self._watch(self.zmq.thread, "the ZeroMQ frontend's thread")
        self._banner()
        assert self._thread is not None
        _join(self._thread)  # until drained (signal handlers run in this thread meanwhile)
        return 1 if self.broken is not None else 0

    def _load(self) -> Pool:
        opts = self.options
        progress = Progress(sys.stderr, tty=False if opts.log_format == "json" else None)
        root = logging.getLogger()
        handlers = root.handlers[:]
        if progress.tty and handlers:  # log records go above the live display
            formatter = handlers[0].formatter or logging.Formatter()
            root.handlers = [progress.log_handler(formatter)]

        def observe(snapshot: Callable[[], dict[str, ModelHealth]]) -> None:
            self.state.starting = snapshot  # the metrics and /v2/repository/index show the load
            progress.observe(snapshot)

        log.info("loading %s", opts.repository)
        t0 = time.monotonic()
        try:
            pool = start_pool(
                opts.repository,
                observe,
                strict=opts.strict,
                start_timeout=opts.start_timeout,
                busy_poll_us=opts.busy_poll_us,
                wake_limit=opts.wake_limit,
                front_cpus=opts.front_cpus,
                execution_timeout=opts.execution_timeout,
                start_method=opts.start_method,
                load_models=self.control.startup_models(),
            )
        finally:
            progress.close()
            root.handlers = handlers
        statuses = pool.models()
        failed = [s for s in statuses if s.state == "failed"]
        log.info(
            "loaded %d model versions of %d models in %.1f s%s",
            len(statuses) - len(failed),
            len({s.name for s in statuses}),
            time.monotonic() - t0,
            f"; {len(failed)} failed" if failed else "",
        )
        for s in failed:
            log.error("model %s%s is not served: %s", s.name, "" if s.version is None else f" v{s.version}", s.error)
        return pool

    def _start_zmq(self) -> bool:
        from .zmq_frontend import ZmqFrontend  # pyzmq's server side, only when asked for

        opts = self.options
        assert opts.zmq is not None
        kwargs: dict[str, Any] = {"curve_secret_key": opts.curve_secret_key, "insecure": opts.insecure}
        if "max_request_bytes" in inspect.signature(ZmqFrontend).parameters:
            kwargs["max_request_bytes"] = opts.limits.max_request_bytes
        try:
            self.zmq = ZmqFrontend(self.pool, opts.zmq, **kwargs)
            self.zmq.start()
        except (TorchRTError, OSError, ValueError) as e:
            log.error("cannot serve ZeroMQ on %s (--zmq): %s", opts.zmq, e)
            return False
        return True

    # ── the serving thread ─────────────────────────────────────────────────

    def _start_serving(self) -> bool:
        """Start the serving thread; return once uvicorn answers on every socket (False,
        logged, if it could not start)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serving, name="libtorchrt-serving", daemon=True)
        self._thread.start()
        self._listening.wait()  # (set also if the thread fails)
        if self._serving_error is not None:
            if isinstance(self._serving_error, OSError):  # (a taken gRPC port: the message says which)
                log.error("%s", self._serving_error)
            else:
                log.error("cannot serve HTTP: %r", self._serving_error)
            return False
        urls = [f"{_url(self.sockets['http'])} (HTTP)"] if "http" in self.sockets else []
        if self._grpc is not None:
            urls.append(f"{self._grpc_address()} (gRPC)")
        if "metrics" in self.sockets:
            urls.append(f"{_url(self.sockets['metrics'], '/metrics')} (metrics)")
        if urls:
            log.info("listening on %s; the probes answer while the models load", " and ".join(urls))
        return True

    def _serving(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._serving_error = e
            if self._listening.is_set():  # it served, then failed: a bug
                log.critical("the HTTP server's event loop failed", exc_info=True)
                self.broken = "the HTTP server's event loop"
        finally:
            self._listening.set()  # (never leave the main thread waiting)
            try:
                if self._grpc is not None:  # (stopped already, unless the start failed)
                    loop.run_until_complete(self._grpc.stop(0.0))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _stop_serving(self) -> None:
        """Make the serving thread drain and end (from any thread, or a signal handler)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # (the loop closed already)
                self._loop.call_soon_threadsafe(self._stop.set)

    def _on_signal(self, count: int) -> None:
        if count == 1:
            self._stop_serving()
            return
        log.warning("second stop signal: failing the requests in flight and stopping now")
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._forced.set)

    async def _serve(self) -> None:
        opts = self.options
        loop = asyncio.get_running_loop()
        if opts.grpc is not None:  # bound first: a taken port fails before anything else starts
            from .grpc_server import GrpcServer  # grpcio, only when asked for

            self._grpc = GrpcServer(self.state, token=opts.token, tls=opts.grpc_tls)
            await self._grpc.start(opts.grpc)
        apps = {"http": build_app(self.state, token=opts.token)}
        if "metrics" in self.sockets:
            apps["metrics"] = build_metrics_app(self.state)
        tasks = []
        for key, sock in self.sockets.items():
            config = uvicorn.Config(
                apps[key],
                log_config=None,
                log_level=None,
                access_log=opts.access_log and key == "http",
                lifespan="off",
                timeout_graceful_shutdown=int(opts.grace) or 1,
                # Longer than the idle timeouts of load balancers (60 s), so that the
                # server never closes a kept-alive connection a client is about to use.
                timeout_keep_alive=KEEP_ALIVE_S,
                server_header=False,
                proxy_headers=False,
            )
            server = _Uvicorn(config)
            self._servers.append(server)
            tasks.append(asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-{key}"))
        for server, task in zip(self._servers, tasks):
            while not server.started and not task.done():  # uvicorn has no started event
                await asyncio.sleep(0.01)
            if task.done():
                task.result()  # raises why it did not start
                raise RuntimeError(f"{task.get_name()} stopped as it started")
        self._listening.set()
        done = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([done, *tasks], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        if self.broken is not None:
            log.critical("%s stopped unexpectedly; exiting with status 1 so that a supervisor restarts the server",
                         self.broken)  # fmt: skip
        if self.state.pool is None:
            log.info("stopping")
        else:
            log.info("stopping: draining requests in flight (up to %.0f s)", opts.grace)
        self.state.draining = True  # ready answers 400, new inference requests 503
        self.control.stop()  # (no model is loaded or unloaded any more)
        zmq = self.zmq
        zmq_closed = loop.run_in_executor(None, zmq.close, opts.grace) if zmq is not None else None
        await self._drain(opts.grace)
        for server in self._servers:
            server.should_exit = True
        stopping = []
        if self._grpc is not None:
            stopping.append(self._grpc.stop(0.0 if self._forced.is_set() else GRPC_STOP_GRACE_S))
        await asyncio.gather(*tasks, *stopping, return_exceptions=True)
        if zmq_closed is not None:
            await zmq_closed
        done.cancel()

    async def _drain(self, grace: float) -> None:
        """Keep listening while the HTTP and gRPC requests in flight finish, for up to ``grace``
        seconds: probes see not-ready (a load balancer takes the server out) and new
        requests get 503, on the connections clients hold and on new ones. A second
        signal ends the wait: the pool fails what still runs, and each request is
        answered with that error before the listener closes."""
        state = self.state
        idle = asyncio.Event()
        state.on_idle = idle.set
        if not state.inflight:
            idle.set()
        waits = [asyncio.ensure_future(idle.wait()), asyncio.ensure_future(self._forced.wait())]
        try:
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            state.on_idle = None
        if self._forced.is_set() or not idle.is_set():
            loop = asyncio.get_running_loop()
            closing = [loop.run_in_executor(None, self.zmq.close, 0.0)] if self.zmq is not None else []
            if self.pool is not None:  # (its requests fail with PoolClosedError: answered 503)
                closing.append(loop.run_in_executor(None, self.pool.close, 0.0))
            await asyncio.gather(*closing, return_exceptions=True)

    def _watch(self, thread: threading.Thread, what: str) -> None:
        """Stop serving if ``thread`` ends while we serve: a thread the server depends on
        died (a bug), and a server that only looks alive would never be restarted. The
        watcher blocks in ``join`` (an event, not a poll) and ends with the thread."""

        def watch() -> None:
            thread.join()
            if self._stopping:
                return
            self.broken = what
            self.state.broken = what  # /v2/health/live answers 503 from now on
            self._stop_serving()

        watcher = threading.Thread(target=watch, name=f"libtorchrt-watch-{thread.name}", daemon=True)
        watcher.start()
        self._watches.append(watcher)

    def _banner(self) -> None:
        assert self.pool is not None
        statuses = self.pool.models()
        ready = [s for s in statuses if s.state == "ready"]
        failed = [s for s in statuses if s.state == "failed"]
        lines = [
            f"libtorchrt-pool {__version__} ready: {len(ready)} model versions"
            + (f", {len(failed)} failed" if failed else "")
        ]
        auth = "; bearer token required" if self.options.token else ""
        if "http" in self.sockets:
            lines.append(f"  HTTP     {_url(self.sockets['http'])}  (KServe v2{auth})")
        if self._grpc is not None:
            tls = "TLS, " if self.options.grpc_tls is not None else ""
            lines.append(f"  gRPC     {self._grpc_address()}  ({tls}KServe v2 / Triton{auth})")
        if self.zmq is not None:
            key = getattr(self.zmq, "curve_public_key", None)
            extra = f"  (CURVE server key {key.decode()})" if key else ""
            lines.append(f"  ZeroMQ   {self.zmq.endpoint}{extra}")
        if "metrics" in self.sockets:
            lines.append(f"  metrics  {_url(self.sockets['metrics'], '/metrics')}")
        print("\n".join(lines), flush=True)

    def _grpc_address(self) -> Address:
        assert self.options.grpc is not None and self._grpc is not None
        return Address(self.options.grpc.host, self._grpc.port)

    def _close(self) -> None:
        self._stopping = True
        self.control.stop()
        grace = self.options.grace
        if self._thread is not None and self._thread.is_alive():  # the start failed or was stopped
            self._stop_serving()
            self._thread.join(grace + 30.0)
            if self._thread.is_alive():
                log.warning("the HTTP server did not stop within %.0f s", grace + 30.0)
        if self.zmq is not None:
            self.zmq.close(grace)  # (it removes its ipc:// socket file itself, holding its lock)
        if self.pool is not None:
            self.pool.close(grace)
            log.info("stopped")
        self.control.join(10.0)  # (a load it made failed when the pool closed)
        self.state.regions.close()  # (the clients' shared memory: descriptors closed, nothing unlinked)
        for watcher in self._watches:  # (their threads have ended: they end too)
            watcher.join(5.0)
        for sock in self.sockets.values():
            sock.close()


def serve(options: Options) -> int:
    """Run the pool server until SIGTERM or SIGINT; return the exit status.

    Returns:
        0 after a clean stop (also when stopped while loading), 1 when a port is
        taken, nothing could be loaded, or the ZeroMQ endpoint cannot be served.
    """
    return _Service(options).run()
