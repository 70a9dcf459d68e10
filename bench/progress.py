"""A one-line progress bar on stderr (redrawn in place on a terminal, a line per phase otherwise)."""

from __future__ import annotations

import sys
import time

WIDTH = 24


class Progress:
    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._drawn = 0.0
        self._t0 = time.monotonic()
        self._last_line = ""

    def update(self, fraction: float, records: int, phase: str) -> None:
        now = time.monotonic()
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * WIDTH)
        line = (
            f"{self.label} {phase:<8} [{'#' * filled}{'.' * (WIDTH - filled)}] "
            f"{fraction * 100:3.0f}% {records:>12,} rec {now - self._t0:6.1f} s"
        )
        self._last_line = line
        if self.tty and now - self._drawn >= 0.1:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
            self._drawn = now

    def done(self, summary: str) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
        sys.stderr.write(f"{self.label} {summary}\n")
        sys.stderr.flush()


def say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
