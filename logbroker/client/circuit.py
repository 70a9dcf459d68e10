"""A circuit breaker per broker: a client stops sending to a broker that keeps failing, for a while.

    CLOSED --(failures_max consecutive failures)--> OPEN
    OPEN   --(cool_down_ms passed; the next request is let through: the probe)--> HALF_OPEN
    HALF_OPEN --(the probe succeeds)--> CLOSED
    HALF_OPEN --(the probe fails)--> OPEN (a new cool-down)

A failure is a whole call failing for the broker's sake: unreachable, timed out, refused for
overload (RESOURCE_EXHAUSTED with a retry-after). A per-partition error (not the leader, ...) or a
final refusal (permission) says nothing about the broker's health and is neither. While the circuit
is OPEN the client sends nothing to the broker: the producer keeps that broker's batches queued (they
still expire at their delivery deadline), Metadata goes to other brokers first. HALF_OPEN lets one
request through (`allow` answers True once) and holds the rest until it is answered.

`Circuit` is the pure state machine of one broker, time passed in (ms on a monotonic clock);
`Circuits` the clients' shell: one circuit per broker address (at most `ADDRESSES_MAX`; a closed
circuit without failures is forgotten), thread-safe, on an injected clock, writing one log line when
a circuit opens (a WARNING, rate-limited per address by logbroker/log_throttle.py) and one when it
closes (INFO).

Defaults: 5 consecutive failures (a producer's retries of one batch with the client's backoff take
about 1.5 s to fail 5 times) open the circuit for 2 s, longer than the broker's overload hint (100 ms)
and the client's longest backoff (1 s), short beside a delivery timeout (120 s).
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass

from logbroker.clock import SYSTEM_CLOCK, Clock, monotonic_s
from logbroker.log_throttle import LogThrottle

log = logging.getLogger(__name__)

FAILURES_MAX = 5
COOL_DOWN_MS = 2_000
ADDRESSES_MAX = 4096
OPEN_WARNING_INTERVAL_S = 60.0


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class Circuit:
    """One broker's circuit (pure: `now_ms` on a monotonic clock is passed in)."""

    failures_max: int = FAILURES_MAX
    cool_down_ms: int = COOL_DOWN_MS
    state: State = State.CLOSED
    failures: int = 0  # consecutive
    opened_at_ms: int = 0
    probing: bool = False  # HALF_OPEN: the probe is out

    def allow(self, now_ms: int) -> bool:
        """Whether a request may go to the broker now; True in HALF_OPEN only for the probe."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if now_ms < self.opened_at_ms + self.cool_down_ms:
                return False
            self.state = State.HALF_OPEN
        if self.probing:
            return False
        self.probing = True
        return True

    def blocked_ms(self, now_ms: int) -> int:
        """How long until `allow` may answer True (0: now, or once the probe is answered)."""
        if self.state is State.OPEN:
            return max(0, self.opened_at_ms + self.cool_down_ms - now_ms)
        return 0

    def failed(self, now_ms: int) -> bool:
        """Count a failed call; True when this opened the circuit."""
        self.failures += 1
        self.probing = False
        if self.state is State.HALF_OPEN or (self.state is State.CLOSED and self.failures >= self.failures_max):
            self.state = State.OPEN
            self.opened_at_ms = now_ms
            return True
        return False

    def succeeded(self) -> bool:
        """Count an answered call; True when this closed an open (or half-open) circuit."""
        was_open = self.state is not State.CLOSED
        self.state = State.CLOSED
        self.failures = 0
        self.probing = False
        return was_open


class Circuits:
    """The circuits of a client's brokers, by address (see the module doc)."""

    def __init__(self, failures_max: int = FAILURES_MAX, cool_down_ms: int = COOL_DOWN_MS,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if failures_max < 1 or cool_down_ms < 0:
            raise ValueError(f"failures_max must be >= 1 and cool_down_ms >= 0, got {failures_max}, {cool_down_ms}")
        self.failures_max = failures_max
        self.cool_down_ms = cool_down_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._circuits: dict[str, Circuit] = {}
        self._warnings = LogThrottle(OPEN_WARNING_INTERVAL_S, monotonic=monotonic_s(clock))

    def state(self, address: str) -> State:
        with self._lock:
            circuit = self._circuits.get(address)
            return State.CLOSED if circuit is None else circuit.state

    def allow(self, address: str) -> bool:
        """Whether a request may go to `address` now (HALF_OPEN: True once, for the probe)."""
        with self._lock:
            circuit = self._circuits.get(address)
            return circuit is None or circuit.allow(self._clock.monotonic_ms())

    def blocked_ms(self, address: str) -> int:
        with self._lock:
            circuit = self._circuits.get(address)
            return 0 if circuit is None else circuit.blocked_ms(self._clock.monotonic_ms())

    def failed(self, address: str, why: object = "") -> None:
        with self._lock:
            circuit = self._circuits.get(address)
            if circuit is None:
                if len(self._circuits) >= ADDRESSES_MAX:
                    return  # bounded: an address beyond the bound has no circuit
                circuit = self._circuits[address] = Circuit(self.failures_max, self.cool_down_ms)
            opened = circuit.failed(self._clock.monotonic_ms())
            count = self._warnings.event(address) if opened else 0
        if count:
            log.warning("circuit to broker %s opened after %d consecutive failures: no requests to it for %d ms, "
                        "then one probe (opened %d time(s) since the last such line); last failure: %s",
                        address, circuit.failures, self.cool_down_ms, count, why)

    def succeeded(self, address: str) -> None:
        with self._lock:
            circuit = self._circuits.get(address)
            if circuit is None:
                return
            closed = circuit.succeeded()
            del self._circuits[address]  # closed and without failures: nothing to remember
        if closed:
            log.info("circuit to broker %s closed: it answered the probe", address)
