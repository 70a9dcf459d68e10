"""Admission of new record-transport connections, before anything of them is read (issue 18 item 5).

A pure state machine over an injected monotonic clock; server/wire_server.py asks it on every
accepted socket, before any TLS handshake, and tells it when an admitted connection ends.

- `connections_max` connections admitted at once (open ones and TLS handshakes in progress);
- `per_ip_max` of them from one client address;
- `rate_per_sec` new connections per second, all addresses together: a token bucket holding at most
  one second's worth (a burst of `rate_per_sec`), refilled continuously; 0: no rate limit. Only an
  admitted connection takes a token (one refused for another reason costs none).

`admit(host)` answers None (admitted: the caller must `release(host)` exactly once when it ends) or
the reason it is refused (REFUSED_*). Memory: one counter per address with a connection admitted,
so at most `connections_max` addresses.
"""

from __future__ import annotations

import time
from collections.abc import Callable

REFUSED_CONNECTIONS_MAX = "connections_max"
REFUSED_PER_IP = "max_connections_per_ip"
REFUSED_RATE = "max_connection_creation_rate_per_sec"


class ConnectionGate:
    def __init__(self, connections_max: int, per_ip_max: int, rate_per_sec: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.connections_max = connections_max
        self.per_ip_max = per_ip_max
        self.rate_per_sec = rate_per_sec
        self._monotonic = monotonic
        self._tokens = float(rate_per_sec)
        self._refilled = monotonic()
        self._per_ip: dict[str, int] = {}
        self.admitted = 0  # connections admitted and not released
        self.refused: dict[str, int] = {}  # reason -> connections refused for it, ever

    def admit(self, host: str) -> str | None:
        reason = self._refusal(host)
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            return reason
        if self.rate_per_sec > 0:
            self._tokens -= 1
        self.admitted += 1
        self._per_ip[host] = self._per_ip.get(host, 0) + 1
        return None

    def release(self, host: str) -> None:
        n = self._per_ip.get(host, 0)
        if n <= 0:
            raise AssertionError(f"released a connection of {host} that was not admitted")
        if n == 1:
            del self._per_ip[host]
        else:
            self._per_ip[host] = n - 1
        self.admitted -= 1

    def open_from(self, host: str) -> int:
        return self._per_ip.get(host, 0)

    def _refusal(self, host: str) -> str | None:
        if self.admitted >= self.connections_max:
            return REFUSED_CONNECTIONS_MAX
        if self._per_ip.get(host, 0) >= self.per_ip_max:
            return REFUSED_PER_IP
        if self.rate_per_sec > 0:
            now = self._monotonic()
            self._tokens = min(float(self.rate_per_sec), self._tokens + (now - self._refilled) * self.rate_per_sec)
            self._refilled = now
            if self._tokens < 1:
                return REFUSED_RATE
        return None
