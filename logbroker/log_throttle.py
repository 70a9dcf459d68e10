"""Log lines that a caller can provoke at will (a refused connection, a refused inter-broker call):
at most one per `interval_s` per key, each saying how many events it stands for.

`LogThrottle.event(key)` counts an event and answers how many events the line to write now stands
for (this one and those suppressed since the key's last line), or 0 when no line is due. Pure
state plus an injected monotonic clock (seconds); owned by one thread (the broker's event loop).

Bounds: at most `keys_max` keys are tracked. When a new key would exceed it, keys whose interval
has passed are dropped (their unlogged events stay in `total`); if none can be, the event is
counted under `OVERFLOW_KEY`, so a caller inventing keys (new addresses) still gets one line per
interval for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

DEFAULT_INTERVAL_S = 10.0
KEYS_MAX = 1024
OVERFLOW_KEY = "(other)"


class LogThrottle:
    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, keys_max: int = KEYS_MAX,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.keys_max = max(1, keys_max)
        self.monotonic = monotonic
        self.total = 0  # events ever counted, logged or not
        self._last_line: dict[Hashable, float] = {}  # key -> when its last line was due
        self._suppressed: dict[Hashable, int] = {}  # key -> events since that line

    def event(self, key: Hashable) -> int:
        """Count one event; the number of events a line written now stands for, or 0: no line."""
        self.total += 1
        now = self.monotonic()
        key = self._tracked(key, now)
        last = self._last_line.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return 0
        self._last_line[key] = now
        return self._suppressed.pop(key, 0) + 1

    def suppressed(self, key: Hashable) -> int:
        """Events of `key` counted since its last line and not logged yet."""
        return self._suppressed.get(key, 0)

    def _tracked(self, key: Hashable, now: float) -> Hashable:
        if key in self._last_line or len(self._last_line) < self.keys_max:
            return key
        for old, at in list(self._last_line.items()):
            if now - at >= self.interval_s:  # its suppressed events stay in `total`
                del self._last_line[old]
                self._suppressed.pop(old, None)
        return key if len(self._last_line) < self.keys_max else OVERFLOW_KEY
