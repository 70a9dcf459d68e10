"""Client quotas, as Kafka's KIP-13 (byte rates) and KIP-124 (request-time share) — pure: the broker
feeds `QuotaManager` the quotas it caches from the metadata store and the usage of each call, with
the time as an argument, and gets back how long to throttle the caller.

An entity is (user, client id); each part is a name, `DEFAULT` (``<default>``: any user / any client
id without a quota of its own) or None (not part of the entity). A caller (user U, client id C)
takes each kind of quota from the first entity of this list that sets it (Kafka's precedence)::

    (U, C)  (U, <default>)  (U, None)  (<default>, C)  (<default>, <default>)  (<default>, None)
    (None, C)  (None, <default>)

The quota kinds (`QuotaKind`): `producer_byte_rate` (bytes/s of produced record batches),
`consumer_byte_rate` (bytes/s of fetch responses) and `request_percentage` (the share of one
event-loop's time the caller's calls take, in percent per second: 50 = half a second per second).
A rate is measured as Kafka's: `samples` windows of `window_ms` each; the rate is the sum of the
live windows over their elapsed time (never less than `samples - 1` whole windows, so a short
burst is averaged over that span). Usage is always recorded (nothing is dropped); when the rate is
over the quota the throttle time is Kafka's `(rate - quota) / quota * elapsed`: the delay after
which the rate is back at the quota. It is bounded by `max_throttle_ms` (30 s). Not by the span of
the windows, as Kafka does: usage older than the span is forgotten, so a throttle cut to the span
would let a client that is far over its quota (a burst of pipelined requests) keep the excess.

Usage is kept per (kind, user, client id) as the matched quota entity names it: a `<default>` part
is the caller's own name (each user gets the default quota for itself), a None part is shared.
At most `max_sensors` such measurements live at once; the least recently used goes first.

The stored form (`Quota.to_json` / `from_json`) is one JSON object per entity: {"user": ...,
"client_id": ..., "producer_byte_rate": ..., ...}, absent parts and unset kinds left out.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT = "<default>"
MAX_QUOTAS = 10_000
MAX_NAME_CHARS = 249
MAX_RATE = 1e15  # bytes/s or percent; anything above is a typo
DEFAULT_SAMPLES = 11  # Kafka's quota.window.num
DEFAULT_WINDOW_MS = 1000  # Kafka's quota.window.size.seconds
DEFAULT_MAX_SENSORS = 10_000
DEFAULT_MAX_THROTTLE_MS = 30_000


class QuotaError(ValueError):
    """A quota refused as malformed; the message says which field and why."""


class QuotaKind(enum.Enum):
    PRODUCE = "producer_byte_rate"
    FETCH = "consumer_byte_rate"
    REQUEST = "request_percentage"


def _check_name(what: str, name: str | None) -> str | None:
    if name is None:
        return None
    if not name or len(name) > MAX_NAME_CHARS or any(ord(c) < 0x20 for c in name):
        raise QuotaError(f"{what} must be 1..{MAX_NAME_CHARS} printable characters (or {DEFAULT})")
    return name


@dataclass(frozen=True, slots=True)
class QuotaEntity:
    user: str | None = None
    client_id: str | None = None

    def validated(self) -> QuotaEntity:
        _check_name("user", self.user)
        _check_name("client id", self.client_id)
        if self.user is None and self.client_id is None:
            raise QuotaError("a quota names a user, a client id, or both (each may be <default>)")
        return self

    def describe(self) -> str:
        parts = [f"user={self.user}" if self.user is not None else "",
                 f"client-id={self.client_id}" if self.client_id is not None else ""]
        return " ".join(p for p in parts if p)


def check_rate(kind: QuotaKind, value: float) -> float:
    if not isinstance(value, int | float) or math.isnan(value) or not 0 < value <= MAX_RATE:
        raise QuotaError(f"{kind.value} must be a number > 0 and <= {MAX_RATE:g}, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Quota:
    """One entity's quotas; a kind absent from `rates` is not set here (a later entity may set it)."""

    entity: QuotaEntity
    rates: dict[QuotaKind, float] = field(default_factory=dict)

    def validated(self) -> Quota:
        self.entity.validated()
        for kind, value in self.rates.items():
            check_rate(kind, value)
        return self

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.entity.user is not None:
            out["user"] = self.entity.user
        if self.entity.client_id is not None:
            out["client_id"] = self.entity.client_id
        out.update({k.value: v for k, v in sorted(self.rates.items(), key=lambda kv: kv[0].value)})
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Quota:
        unknown = set(obj) - {"user", "client_id"} - {k.value for k in QuotaKind}
        if unknown:
            raise QuotaError(f"unknown quota fields {sorted(unknown)}")
        rates = {k: float(obj[k.value]) for k in QuotaKind if k.value in obj}
        return cls(QuotaEntity(obj.get("user"), obj.get("client_id")), rates).validated()


class Rate:
    """A rate over `samples` windows of `window_ms` (Kafka's SampledStat + Rate), per second."""

    def __init__(self, samples: int = DEFAULT_SAMPLES, window_ms: int = DEFAULT_WINDOW_MS) -> None:
        if samples < 2 or window_ms < 1:
            raise ValueError("a rate needs at least 2 samples of at least 1 ms")
        self.samples = samples
        self.window_ms = window_ms
        self._windows: deque[list[float]] = deque()  # [start_ms, total], oldest first

    def _expire(self, now_ms: float) -> None:
        while self._windows and now_ms - self._windows[0][0] >= self.samples * self.window_ms:
            self._windows.popleft()

    def record(self, amount: float, now_ms: float) -> None:
        self._expire(now_ms)
        if not self._windows or now_ms - self._windows[-1][0] >= self.window_ms:
            start = now_ms if not self._windows else \
                self._windows[-1][0] + (now_ms - self._windows[-1][0]) // self.window_ms * self.window_ms
            self._windows.append([start, 0.0])
            while len(self._windows) > self.samples:
                self._windows.popleft()
        self._windows[-1][1] += amount

    def elapsed_ms(self, now_ms: float) -> float:
        """The span the rate is measured over: since the oldest live window, at least samples-1 windows."""
        self._expire(now_ms)
        elapsed = now_ms - self._windows[0][0] if self._windows else 0.0
        return max(elapsed, (self.samples - 1) * self.window_ms)

    def measure(self, now_ms: float) -> float:
        elapsed = self.elapsed_ms(now_ms)  # expires the old windows first
        return sum(w[1] for w in self._windows) * 1000.0 / elapsed


def _candidates(user: str, client_id: str) -> list[tuple[QuotaEntity, tuple[str | None, str | None]]]:
    """Kafka's precedence: each matching entity, and the usage key it implies."""
    u, c = user, client_id
    return [(QuotaEntity(u, c), (u, c)), (QuotaEntity(u, DEFAULT), (u, c)), (QuotaEntity(u, None), (u, None)),
            (QuotaEntity(DEFAULT, c), (u, c)), (QuotaEntity(DEFAULT, DEFAULT), (u, c)),
            (QuotaEntity(DEFAULT, None), (u, None)), (QuotaEntity(None, c), (None, c)),
            (QuotaEntity(None, DEFAULT), (None, c))]


class QuotaManager:
    """Every kind of quota of one broker: the configured quotas and the measured usage."""

    def __init__(self, quotas: Iterable[Quota] = (), samples: int = DEFAULT_SAMPLES,
                 window_ms: int = DEFAULT_WINDOW_MS, max_throttle_ms: int = DEFAULT_MAX_THROTTLE_MS,
                 max_sensors: int = DEFAULT_MAX_SENSORS) -> None:
        Rate(samples, window_ms)  # checks the arguments
        self._samples = samples
        self._window_ms = window_ms
        self.max_throttle_ms = max_throttle_ms
        self._max_sensors = max_sensors
        self._quotas: dict[QuotaEntity, Quota] = {}
        self._rates: OrderedDict[tuple[QuotaKind, str | None, str | None], Rate] = OrderedDict()
        self.update(quotas)

    @property
    def size(self) -> int:
        return len(self._quotas)

    def update(self, quotas: Iterable[Quota]) -> None:
        """Replace the configured quotas (measured usage is kept)."""
        self._quotas = {q.entity: q for q in quotas}

    def quota_for(self, kind: QuotaKind, user: str, client_id: str
                  ) -> tuple[float, tuple[str | None, str | None]] | None:
        """The caller's quota of `kind` and its usage key, or None when no entity sets it."""
        if not self._quotas:
            return None
        for entity, key in _candidates(user, client_id):
            q = self._quotas.get(entity)
            if q is not None and kind in q.rates:
                return q.rates[kind], key
        return None

    def record(self, kind: QuotaKind, user: str, client_id: str, amount: float, now_ms: float) -> int:
        """Record usage; return the throttle time in ms (0: within quota, or no quota applies)."""
        found = self.quota_for(kind, user, client_id)
        if found is None:
            return 0
        quota, key = found
        rate = self._rate((kind, *key))
        rate.record(amount, now_ms)
        measured = rate.measure(now_ms)
        if measured <= quota:
            return 0
        throttle = (measured - quota) / quota * rate.elapsed_ms(now_ms)
        return int(min(math.ceil(throttle), self.max_throttle_ms))

    def _rate(self, key: tuple[QuotaKind, str | None, str | None]) -> Rate:
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = Rate(self._samples, self._window_ms)
            while len(self._rates) > self._max_sensors:
                self._rates.popitem(last=False)
        else:
            self._rates.move_to_end(key)
        return rate
