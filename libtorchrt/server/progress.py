"""Start-up progress of the pool server: each model's instances loading, warming up,
ready (server process, main thread plus one display thread while the pool starts).

On a terminal the state of every instance is one line, redrawn in place; log records
emitted meanwhile are printed above it. Otherwise (a file, a pipe, a container's log)
each change is one plain log line, so the log reads as a history::

    resnet_classifier v1 instance 0: loading (pid 4242)
    resnet_classifier v1 instance 0: warming up
    resnet_classifier v1 instance 0: ready after 2.3 s
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import IO

from ..info import ModelHealth

__all__ = ["LABELS", "Progress"]

log = logging.getLogger("libtorchrt.server")

#: how each instance state is shown
LABELS = {
    "starting": "loading",
    "warming": "warming up",
    "ready": "ready",
    "restarting": "restarting",
    "failed": "failed",
    "stopped": "stopped",
}
_GREEN, _YELLOW, _RED, _RESET = "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m"
_COLORS = {"ready": _GREEN, "failed": _RED, "restarting": _RED, "loading": _YELLOW, "warming up": _YELLOW}

Snapshot = Callable[[], dict[str, ModelHealth]]


class Progress:
    """Shows the pool's start-up, from :meth:`observe` until :meth:`close`.

    Args:
        stream: where the terminal display goes (stderr).
        tty: draw in place (default: whether ``stream`` is a terminal); False logs lines.
        interval: seconds between two looks at the pool (a display refresh only).
    """

    def __init__(self, stream: IO[str], *, tty: bool | None = None, interval: float = 0.1) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._drawn = 0  # lines of the display on screen
        self._since: dict[tuple[str, int, int], float] = {}
        self._states: dict[tuple[str, int, int], str] = {}
        #: the instances whose "loading" line named a pid
        self._pids: set[tuple[str, int, int]] = set()
        self._ready_at: dict[tuple[str, int, int], float] = {}
        self._model_errors: dict[tuple[str, int], str] = {}

    # ── lifetime ───────────────────────────────────────────────────────────

    def observe(self, snapshot: Snapshot) -> None:
        """Start showing the states ``snapshot()`` returns (called once the pool's
        router exists, from the thread that starts the pool)."""
        self._snapshot = snapshot
        self._thread = threading.Thread(target=self._run, name="libtorchrt-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Show the last states and stop. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
            self._update()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._update()
            except Exception:  # the display must never break the start
                log.debug("progress display failed", exc_info=True)

    # ── display ────────────────────────────────────────────────────────────

    def _update(self) -> None:
        if self._snapshot is None:
            return
        health = {(h.model, h.version): h for h in self._snapshot().values()}
        with self._lock:
            now = time.monotonic()
            rows = []
            for (model, version), h in sorted(health.items()):
                if h.state in ("failed", "unavailable") and h.error:
                    if self._model_errors.get((model, version)) != h.error and not self.tty:
                        log.error("%s v%d failed to load: %s", model, version, h.error)
                    self._model_errors[(model, version)] = h.error
                for inst in h.instances:
                    key = (model, version, inst.instance)
                    label = LABELS.get(inst.state, inst.state)
                    self._since.setdefault(key, now)
                    if self._states.get(key) != label:
                        self._states[key] = label
                        if label == "ready":
                            self._ready_at[key] = now
                        if not self.tty:
                            self._log_change(key, label, inst.pid)
                    elif label == "loading" and inst.pid is not None and key not in self._pids and not self.tty:
                        # (a worker forked once the template is up: its pid comes after "loading")
                        self._log_change(key, label, inst.pid)
                    if label == "loading" and inst.pid is not None:
                        self._pids.add(key)
                    if label == "ready":
                        clock = f"in {self._ready_at[key] - self._since[key]:.1f} s"
                    else:
                        clock = f"{now - self._since[key]:.1f} s"
                    rows.append((f"{model} v{version}", inst.instance, label, clock))
            if self.tty:
                self._draw(rows)

    def _log_change(self, key: tuple[str, int, int], label: str, pid: int | None) -> None:
        model, version, instance = key
        name = f"{model} v{version} instance {instance}"
        if label == "ready":
            log.info("%s: ready after %.1f s", name, self._ready_at[key] - self._since[key])
        elif label == "loading" and pid is not None:
            log.info("%s: loading (pid %d)", name, pid)
        elif label in ("failed", "restarting"):
            log.warning("%s: %s", name, label)
        else:
            log.info("%s: %s", name, label)

    def _draw(self, rows: list[tuple[str, int, str, str]]) -> None:
        width = max((len(name) for name, *_ in rows), default=0)
        text = []
        for name, instance, label, clock in rows:
            color = _COLORS.get(label, "")
            shown = f"{color}{label:<11}{_RESET}" if color else f"{label:<11}"
            text.append(f"  {name:<{width}}  instance {instance}  {shown} {clock}")
        for (model, version), error in sorted(self._model_errors.items()):
            first = error.strip().splitlines()[0] if error.strip() else ""
            text.append(f"  {_RED}{model} v{version} failed: {first}{_RESET}")
        self._erase()
        for line in text:
            self.stream.write(line + "\n")
        self._drawn = len(text)
        self.stream.flush()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the display's first line, clear below
            self._drawn = 0

    def write_above(self, text: str) -> None:
        """Print ``text`` (a log record) above the display, then draw the display again."""
        with self._lock:
            redraw = self._drawn > 0
            self._erase()
            self.stream.write(text + "\n")
            self.stream.flush()
            if redraw:
                try:
                    self._update()
                except Exception:  # the display must never lose a log record
                    pass

    def log_handler(self, formatter: logging.Formatter) -> logging.Handler:
        """A logging handler printing records above the display (terminal mode)."""
        return _AboveHandler(self, formatter)


class _AboveHandler(logging.Handler):
    def __init__(self, progress: Progress, formatter: logging.Formatter) -> None:
        super().__init__()
        self.progress = progress
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.write_above(self.format(record))
        except Exception:
            self.handleError(record)
