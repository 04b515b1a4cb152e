"""A progress line on stderr while the sweep runs (bench process, main thread only).

On a terminal it is a bar redrawn in place (``\\r``), cleared before each table row
so that rows and bar do not mix; elsewhere (a pipe, a CI log) it prints one plain line
when each configuration starts. The estimate of the time left is the average time of
the configurations done so far times those still to run.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress over ``total`` configurations.

    Args:
        total: configurations to run.
        out: where to draw (default stderr).
        enabled: False draws nothing.
        width: characters of the bar.
    """

    def __init__(self, total: int, *, out: TextIO | None = None, enabled: bool = True, width: int = 24) -> None:
        self.total = max(total, 1)
        self.out = out if out is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.label = ""
        self.detail = ""
        self.started = time.monotonic()
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._drawn = 0

    def text(self) -> str:
        """The progress line as it would be drawn now."""
        elapsed = time.monotonic() - self.started
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        eta = _clock(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        line = f"[{bar}] {self.done}/{self.total}  {_clock(elapsed)} elapsed, ~{eta} left  {self.label}"
        return f"{line} {self.detail}".rstrip()

    def start(self, label: str) -> None:
        """A configuration starts."""
        self.label, self.detail = label, ""
        if not self.enabled:
            return
        if self.tty:
            self._draw()
        else:
            print(f"progress: {self.text()}", file=self.out, flush=True)

    def update(self, detail: str) -> None:
        """News within the current configuration (redrawn on a terminal only)."""
        self.detail = detail
        if self.enabled and self.tty:
            self._draw()

    def advance(self) -> None:
        """The current configuration is done."""
        self.done += 1
        self.detail = ""
        if self.enabled and self.tty:
            self._draw()

    def clear(self) -> None:
        """Erase the bar (before printing something else to the terminal)."""
        if self.enabled and self.tty and self._drawn:
            self.out.write("\r" + " " * self._drawn + "\r")
            self.out.flush()
            self._drawn = 0

    def close(self) -> None:
        """Erase the bar for good."""
        self.clear()

    def _draw(self) -> None:
        line = self.text()[: shutil.get_terminal_size().columns - 1]
        pad = max(0, self._drawn - len(line))
        self.out.write("\r" + line + " " * pad)
        self.out.flush()
        self._drawn = len(line)
