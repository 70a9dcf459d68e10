"""Latency histograms (HdrHistogram, microseconds, 3 significant digits), portable between processes."""

from __future__ import annotations

from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes: anything slower is clamped, never dropped
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 95.0, 99.0, 99.9)
CURVE_PERCENTILES = (0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record(h: HdrHistogram, value_us: int) -> None:
    h.record_value(min(max(value_us, LOWEST_US), HIGHEST_US))


def encode(h: HdrHistogram) -> str:
    return h.encode().decode("ascii")


def merge(encoded: Iterable[str]) -> HdrHistogram:
    h = new()
    for e in encoded:
        if e:
            h.decode_and_add(e.encode("ascii"))
    return h


def percentiles_ms(h: HdrHistogram) -> dict[str, float]:
    """p50, p95, p99, p99.9 and max in milliseconds; empty when nothing was recorded."""
    if h.get_total_count() == 0:
        return {}
    out = {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["max"] = h.get_max_value() / 1000
    return out


def curve_ms(h: HdrHistogram) -> list[tuple[float, float]]:
    if h.get_total_count() == 0:
        return []
    return [(p, h.get_value_at_percentile(p) / 1000) for p in CURVE_PERCENTILES]
