"""The sweep: every combination of mode, parameters, instances, batch size and concurrency.

Runs in the bench process (the pools it starts run their workers as usual: one process
per instance). :func:`plan` lists the configurations in the order they run -- for each
parameter set, for each instance count, the modes side by side, then batch sizes and
concurrencies. Each (mode, parameters, instances) group is served by a fresh server:
a new :class:`libtorchrt.Pool` (``processes``) or a new
:class:`~libtorchrt.bench.threads.ThreadServer` (``threads``), closed before the next
group starts; the concurrencies and batch sizes of a group are load levels against it,
each with its own warm-up, as perf_analyzer sweeps a running server. With
``fresh_per_row`` every configuration gets its own server instead.

Against a running server (``--endpoint``) there is one group, mode ``http``,
``grpc`` or ``zmq``: its instance count and parameters are the server's, and the group's
"server" is a set of connections to it (``remote.py``), closed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libtorchrt import ModelConfig, Pool

from .loadgen import Measurement, MeasurementError, measure_count, measure_windows
from .progress import Progress
from .remote import GrpcServer, HttpServer, ZmqServer
from .report import Row, format_parameters
from .serving import InputFeed, Server, consume
from .source import Target, parameter_values
from .stats import Window
from .threads import ThreadServer

__all__ = ["MODES", "Point", "Settings", "Sweep", "parameter_grid", "plan"]

#: ``processes``: a libtorchrt pool, one worker process per instance;
#: ``threads``: the instances as threads of the bench process (Triton's way);
#: ``http``, ``grpc``, ``zmq``: a running server (``--endpoint``), over HTTP, gRPC or ZeroMQ.
MODES: tuple[str, ...] = ("processes", "threads", "http", "grpc", "zmq")


@dataclass(frozen=True)
class Settings:
    """How each configuration is measured (see loadgen.py)."""

    window_s: float = 2.0
    max_windows: int = 10
    warmup_s: float = 0.5
    requests: int | None = None
    stable_count: int = 3
    threshold: float = 0.10
    request_timeout: float = 60.0
    start_timeout: float = 120.0
    fresh_per_row: bool = False
    http_client: str = "stdlib"
    #: ``Pool(front_cpus=)`` for the pools it starts; None: not pinned
    front_cpus: int | tuple[int, ...] | None = None
    #: the pools' callers make their inputs with ``Pool.empty`` (in the request arena)
    inputs_in_arena: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Point:
    """One configuration to measure."""

    mode: str
    parameters: tuple[tuple[str, str], ...]
    instances: int
    batch_size: int | None
    concurrency: int

    @property
    def server_key(self) -> tuple[str, tuple[tuple[str, str], ...], int]:
        """Configurations with the same key can share a server."""
        return (self.mode, self.parameters, self.instances)

    def label(self) -> str:
        params = format_parameters(dict(self.parameters))
        batch = "" if self.batch_size is None else f" batch={self.batch_size}"
        extra = "" if params == "-" else f" {params}"
        return f"{self.mode} inst={self.instances} conc={self.concurrency}{batch}{extra}"


def parameter_grid(alternatives: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the parameters' alternatives (one empty set when none).

    ``{"A": ["1", "2"], "B": ["x"]}`` → ``[{"A": "1", "B": "x"}, {"A": "2", "B": "x"}]``.
    """
    keys = list(alternatives)
    return [dict(zip(keys, values)) for values in itertools.product(*(alternatives[k] for k in keys))]


def plan(
    *,
    modes: Sequence[str],
    parameter_sets: Sequence[Mapping[str, str]],
    instances: Sequence[int],
    batch_sizes: Sequence[int | None],
    concurrencies: Sequence[int],
) -> list[Point]:
    """The configurations in the order they run (see the module's docstring)."""
    return [
        Point(mode, tuple(params.items()), n, b, c)
        for params in parameter_sets
        for n in instances
        for mode in modes
        for b in batch_sizes
        for c in concurrencies
    ]


class Sweep:
    """Runs planned configurations against ``target`` and reports each row as it finishes.

    Args:
        target: the model and its inputs.
        points: the configurations (from :func:`plan`).
        inputs: the requests' input sets for each batch size of the points.
        settings: how to measure.
        on_row: called with each finished row.
        progress: the progress line to keep up to date.
    """

    def __init__(
        self,
        target: Target,
        points: Sequence[Point],
        inputs: Mapping[int | None, InputFeed],
        settings: Settings,
        *,
        on_row: Callable[[Row], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.target = target
        self.points = list(points)
        self.inputs = inputs
        self.settings = settings
        self.on_row = on_row
        self.progress = progress if progress is not None else Progress(len(points), enabled=False)
        self.rows: list[Row] = []

    def config(self, point: Point) -> ModelConfig:
        """The model configuration of a point.

        Raises:
            ConfigError: a parameter value is invalid.
        """
        base = self.target.config
        params = parameter_values(base.parameters, dict(point.parameters))
        return dataclasses.replace(base, instances=point.instances, parameters=params)

    def check(self) -> None:
        """Build every configuration once, so that bad parameters fail before anything runs.

        Raises:
            ConfigError: a parameter value is invalid.
        """
        for point in self.points:
            self.config(point)

    def groups(self) -> Iterator[list[Point]]:
        """The points, in runs that share one server."""
        if self.settings.fresh_per_row:
            for p in self.points:
                yield [p]
            return
        for _, group in itertools.groupby(self.points, key=lambda p: p.server_key):
            yield list(group)

    def run(self) -> list[Row]:
        """Run every configuration; return the rows (also in :attr:`rows`)."""
        for group in self.groups():
            self._run_group(group)
        return self.rows

    def _emit(self, row: Row) -> None:
        self.rows.append(row)
        self.progress.advance()
        self.progress.clear()
        if self.on_row is not None:
            self.on_row(row)

    def _row(self, point: Point, **kw: Any) -> Row:
        return Row(
            mode=point.mode,
            instances=point.instances,
            concurrency=point.concurrency,
            batch_size=point.batch_size,
            parameters=dict(point.parameters),
            **kw,
        )

    def _run_group(self, group: list[Point]) -> None:
        first = group[0]
        self.progress.start(first.label())
        self.progress.update("starting")
        cfg = self.config(first)
        t0 = time.monotonic()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                server = self._open(first.mode, cfg)
        except Exception as exc:  # a pool or model that cannot start fails its rows, not the sweep
            message = f"{type(exc).__name__}: {exc}"
            for point in group:
                if point is not first:
                    self.progress.start(point.label())
                self._emit(self._row(point, status="error", error=f"could not start: {message}"))
            return
        start_s = time.monotonic() - t0
        notes = list(dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)))
        with server:
            notes += server.notes
            for i, point in enumerate(group):
                if i:
                    self.progress.start(point.label())
                row = self._measure(point, server)
                row.start_s = start_s
                row.flags = server.flags
                row.notes = notes + row.notes + server.news()
                self._emit(row)

    def _open(self, mode: str, cfg: ModelConfig) -> Server:
        s = self.settings
        if mode == "processes":
            return _PoolServer(cfg, s)
        if mode == "threads":
            return _ThreadsServer(cfg, s)
        endpoint = self.target.endpoint
        if mode in ("http", "grpc", "zmq") and endpoint is not None and endpoint.protocol == mode:
            if mode == "http":
                return HttpServer(endpoint, cfg.name, s.request_timeout, s.http_client)
            if mode == "grpc":
                return GrpcServer(endpoint, cfg.name, s.request_timeout)
            return ZmqServer(endpoint, cfg.name, s.request_timeout)
        raise ValueError(f"mode {mode!r} cannot run here; expected one of {MODES} (http, grpc, zmq need an endpoint)")

    def _measure(self, point: Point, server: Server) -> Row:
        s = self.settings
        try:
            call = server.caller(self.inputs[point.batch_size])
        except Exception as exc:
            return self._row(point, status="error", error=f"{type(exc).__name__}: {exc}")

        def on_window(k: int, w: Window) -> None:
            rate = w.rps * (point.batch_size or 1)
            self.progress.update(f"window {k + 1}: {rate:,.0f} infer/s")

        self.progress.update("warm-up")
        try:
            measurement: Measurement
            if s.requests is not None:
                measurement = measure_count(
                    call,
                    concurrency=point.concurrency,
                    requests=s.requests,
                    warmup_s=s.warmup_s,
                    batch_size=point.batch_size or 1,
                    join_timeout=s.request_timeout + 5.0,
                )
            else:
                measurement = measure_windows(
                    call,
                    concurrency=point.concurrency,
                    window_s=s.window_s,
                    max_windows=s.max_windows,
                    warmup_s=s.warmup_s,
                    stable_count=s.stable_count,
                    threshold=s.threshold,
                    batch_size=point.batch_size or 1,
                    join_timeout=s.request_timeout + 5.0,
                    on_window=on_window,
                )
        except MeasurementError as exc:
            return self._row(point, status="error", error=str(exc))
        return self._row(point, measurement=measurement)


class _PoolServer(Server):
    """A libtorchrt pool of ``cfg.instances`` worker processes."""

    def __init__(self, cfg: ModelConfig, settings: Settings) -> None:
        self.name = cfg.name
        self.timeout = settings.request_timeout
        self.pool = Pool(models=[cfg], start_timeout=settings.start_timeout, front_cpus=settings.front_cpus)
        self.notes = []
        workers = self.pool.workers()
        if settings.front_cpus is not None and workers:
            self.notes.append(
                f"front_cpus: callers on CPUs {sorted(os.sched_getaffinity(0))}, workers on {list(workers[0].cpus)}"
            )
        self.in_arena = settings.inputs_in_arena
        if self.in_arena:
            self.notes.append("inputs made with Pool.empty, in the request arena")
        self.flags = dict(workers[0].flags) if workers else {}
        self._restarts = 0

    def caller(self, feed: InputFeed) -> Callable[[], object]:
        pool, name, timeout, sets, take = self.pool, self.name, self.timeout, feed.sets, feed.take
        empty = (lambda t: pool.empty(name, t.shape, t.dtype)) if self.in_arena else None
        realistic = feed.application(lambda inputs: pool.infer(name, inputs, timeout=timeout), empty)
        if realistic is not None:
            return realistic
        if empty is not None:  # (the sets themselves, made there once)
            sets = [{k: empty(t).copy_(t) for k, t in s.items()} for s in sets]

        def call() -> None:
            consume(pool.infer(name, sets[take()], timeout=timeout))

        return call

    def news(self) -> list[str]:
        with contextlib.suppress(Exception):  # health is informative only
            restarts = sum(i.restarts for i in self.pool.health()[self.name].instances)
            new, self._restarts = restarts - self._restarts, restarts
            if new:
                return [f"{new} worker restart(s) during this row"]
        return []

    def close(self) -> None:
        self.pool.close()


class _ThreadsServer(Server):
    """The model's instances as threads of this process (``threads.py``)."""

    def __init__(self, cfg: ModelConfig, settings: Settings) -> None:
        self.timeout = settings.request_timeout
        self.server = ThreadServer(cfg.path, cfg.instances, flags=cfg.flags.values, method=cfg.method)
        self.notes = self.server.notes
        self.flags = {}

    def caller(self, feed: InputFeed) -> Callable[[], object]:
        server, timeout, take = self.server, self.timeout, feed.take
        realistic = feed.application(lambda inputs: server.call(server.bind(inputs), timeout))
        if realistic is not None:
            return realistic
        bound = [server.bind(inputs) for inputs in feed.sets]

        def call() -> None:
            consume(server.call(bound[take()], timeout))

        return call

    def close(self) -> None:
        self.server.close()
