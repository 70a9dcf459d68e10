"""The console's view models (pure: no I/O, no clock of their own; unit-tested without sockets).

- `LagHistory`: per consumer group, the last `samples_max` (time, total lag) samples the console's
  sampler took, for at most `groups_max` groups (the group not sampled the longest is dropped first);
- `partition_rates`: records/s and bytes/s per partition from two reads of a topic (the growth of
  the high watermark and of the size over the time between them; a partition that went back, or is
  new, counts 0 / None), as `logbroker cluster stats` does for topics;
- `chart`: a lag history as the points of an SVG polyline in a fixed box;
- `render_value`: a record's key or value as text (UTF-8, invalid bytes replaced), JSON (pretty
  printed when it parses) or hex (16 bytes a line with offsets), cut at `VALUE_SHOW_MAX_BYTES`;
  the result is plain text: pages.py escapes it;
- `BrowseQuery.parse`: the message browser's query string, checked (bad input: ConsoleInputError).
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from logbroker.client.admin import TopicDescription
from logbroker.errors import LogbrokerError

SAMPLES_MAX_DEFAULT = 360
GROUPS_MAX_DEFAULT = 200
VALUE_SHOW_MAX_BYTES = 16 << 10
BROWSE_COUNT_MAX = 100
BROWSE_COUNT_DEFAULT = 20
RENDER_MODES = ("text", "json", "hex")


class ConsoleInputError(LogbrokerError):
    """A bad query string or form (shown as a page with the message, HTTP 400)."""


@dataclass(frozen=True)
class LagSample:
    at_s: float  # wall-clock seconds since the epoch
    total_lag: int


class LagHistory:
    """Bounded lag samples per group: `samples_max` per group, `groups_max` groups."""

    def __init__(self, samples_max: int = SAMPLES_MAX_DEFAULT, groups_max: int = GROUPS_MAX_DEFAULT) -> None:
        if samples_max < 1 or groups_max < 1:
            raise ValueError("samples_max and groups_max must be >= 1")
        self.samples_max = samples_max
        self.groups_max = groups_max
        self._by_group: OrderedDict[str, deque[LagSample]] = OrderedDict()

    def record(self, group: str, at_s: float, total_lag: int) -> None:
        samples = self._by_group.pop(group, None)
        if samples is None:
            samples = deque(maxlen=self.samples_max)
        samples.append(LagSample(at_s, max(0, total_lag)))
        self._by_group[group] = samples  # the most recently sampled last
        while len(self._by_group) > self.groups_max:
            self._by_group.popitem(last=False)

    def samples(self, group: str) -> list[LagSample]:
        return list(self._by_group.get(group, ()))

    def groups(self) -> list[str]:
        return sorted(self._by_group)


def total_lag(lags: Sequence[int | None]) -> int:
    """The sum of the known lags (None: nothing committed or no leader, not counted)."""
    return sum(lag for lag in lags if lag is not None and lag > 0)


@dataclass(frozen=True)
class PartitionRate:
    records_per_sec: float | None
    bytes_per_sec: float | None


def partition_rates(current: TopicDescription, previous: TopicDescription | None,
                    elapsed_s: float | None) -> dict[int, PartitionRate]:
    """Per partition of `current`: growth since `previous` over `elapsed_s` (None without a previous
    read, a non-positive interval, another incarnation of the topic, or a partition new since)."""
    usable = (previous is not None and elapsed_s is not None and elapsed_s > 0
              and (not current.topic_id or not previous.topic_id or current.topic_id == previous.topic_id))
    before = {p.partition: p for p in previous.partitions} if usable and previous is not None else {}
    out = {}
    for p in current.partitions:
        b = before.get(p.partition)
        if b is None or elapsed_s is None:
            out[p.partition] = PartitionRate(None, None)
        else:
            out[p.partition] = PartitionRate(max(0, p.high_watermark - b.high_watermark) / elapsed_s,
                                             max(0, p.size_bytes - b.size_bytes) / elapsed_s)
    return out


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    points: list[tuple[float, float]]  # in the box, y down
    max_lag: int
    first_at_s: float | None
    last_at_s: float | None


def chart(samples: Sequence[LagSample], width: int = 600, height: int = 160, pad: int = 4) -> Chart:
    """The samples as points in a `width` x `height` box: time left to right, lag 0 at the bottom."""
    if not samples:
        return Chart(width, height, [], 0, None, None)
    t0, t1 = samples[0].at_s, samples[-1].at_s
    top = max(s.total_lag for s in samples)
    span_t = (t1 - t0) or 1.0
    span_y = top or 1
    inner_w, inner_h = width - 2 * pad, height - 2 * pad
    points = []
    for i, s in enumerate(samples):
        x = pad + (inner_w * (s.at_s - t0) / span_t if t1 > t0 else inner_w * i / max(1, len(samples) - 1))
        y = pad + inner_h * (1 - s.total_lag / span_y)
        points.append((round(x, 1), round(y, 1)))
    return Chart(width, height, points, top, t0, t1)


@dataclass(frozen=True)
class Rendered:
    text: str
    note: str = ""  # why it is not shown as asked (not JSON, cut), "" when it is


def _cut(data: bytes) -> tuple[bytes, str]:
    if len(data) <= VALUE_SHOW_MAX_BYTES:
        return data, ""
    return data[:VALUE_SHOW_MAX_BYTES], f"first {VALUE_SHOW_MAX_BYTES} of {len(data)} bytes"


def hexdump(data: bytes) -> str:
    """16 bytes a line: offset, hex, and the printable ASCII (others as '.')."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        ascii_ = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{off:08x}  {chunk.hex(' '):<47}  {ascii_}")
    return "\n".join(lines)


def render_value(data: bytes | None, mode: str) -> Rendered:
    """`data` shown as `mode` (text, json or hex); None is a null key/value."""
    if mode not in RENDER_MODES:
        raise ConsoleInputError(f"unknown view {mode!r}: one of {', '.join(RENDER_MODES)}")
    if data is None:
        return Rendered("", "null")
    shown, cut = _cut(data)
    if mode == "hex":
        return Rendered(hexdump(shown), cut)
    text = shown.decode("utf-8", "replace")
    if mode == "json" and not cut:
        try:
            return Rendered(json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=False))
        except ValueError:
            return Rendered(text, "not JSON: shown as text")
    return Rendered(text, cut)


@dataclass(frozen=True)
class BrowseQuery:
    topic: str
    partition: int
    offset: int
    count: int
    mode: str

    @staticmethod
    def parse(topic: str, params: Mapping[str, str]) -> BrowseQuery:
        """From the browser's query string: partition (default 0), offset (default 0), count (1 to
        BROWSE_COUNT_MAX, default BROWSE_COUNT_DEFAULT), view (text, json, hex; default text)."""
        def number(name: str, default: int, low: int, high: int) -> int:
            raw = params.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConsoleInputError(f"{name} must be a whole number, got {raw!r}") from None
            if not low <= value <= high:
                raise ConsoleInputError(f"{name} must be in [{low}, {high}], got {value}")
            return value

        mode = params.get("view", "text") or "text"
        if mode not in RENDER_MODES:
            raise ConsoleInputError(f"view must be one of {', '.join(RENDER_MODES)}, got {mode!r}")
        return BrowseQuery(topic, number("partition", 0, 0, 1 << 31), number("offset", 0, 0, 1 << 62),
                           number("count", BROWSE_COUNT_DEFAULT, 1, BROWSE_COUNT_MAX), mode)
