"""The delivery headers of `Producer.send(delay_ms=, deliver_at_ms=, ttl_ms=)` (pure).

Share groups (queues) hand a record out no sooner than its `logbroker.deliver-at-ms` header and
never once its `logbroker.ttl-ms` has passed since it became deliverable
(logbroker/group/share_headers.py; values are ASCII decimal milliseconds). `delay_ms` becomes
deliver_at_ms = now + delay_ms here, on the client, so the delay counts from `send()`. Plain
consumers and consumer groups ignore these headers.

Checked at send (ValueError): no negative value; delay_ms and deliver_at_ms not both; a delivery
time at most share_headers.DELAY_MAX_MS ahead of now; ttl_ms at most share_headers.TTL_MAX_MS.
Headers of the caller with these names are replaced.
"""

from __future__ import annotations

from logbroker.group import share_headers

_NAMES = (share_headers.DELIVER_AT_MS, share_headers.TTL_MS)


def delivery_headers(now_ms: int, delay_ms: int | None, deliver_at_ms: int | None,
                     ttl_ms: int | None) -> list[tuple[str, bytes]]:
    """The headers to add for these arguments (none for all None)."""
    for name, value in (("delay_ms", delay_ms), ("deliver_at_ms", deliver_at_ms), ("ttl_ms", ttl_ms)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if delay_ms is not None and deliver_at_ms is not None:
        raise ValueError("give delay_ms or deliver_at_ms, not both")
    out: list[tuple[str, bytes]] = []
    if delay_ms is not None:
        if delay_ms > share_headers.DELAY_MAX_MS:
            raise ValueError(f"delay_ms must be at most {share_headers.DELAY_MAX_MS} (30 days), got {delay_ms}")
        deliver_at_ms = now_ms + delay_ms
    elif deliver_at_ms is not None and deliver_at_ms - now_ms > share_headers.DELAY_MAX_MS:
        raise ValueError(f"deliver_at_ms must be at most {share_headers.DELAY_MAX_MS} ms (30 days) ahead, "
                         f"got {deliver_at_ms - now_ms} ms ahead")
    if deliver_at_ms is not None:
        out.append((share_headers.DELIVER_AT_MS, str(deliver_at_ms).encode("ascii")))
    if ttl_ms is not None:
        if ttl_ms > share_headers.TTL_MAX_MS:
            raise ValueError(f"ttl_ms must be at most {share_headers.TTL_MAX_MS} (365 days), got {ttl_ms}")
        out.append((share_headers.TTL_MS, str(ttl_ms).encode("ascii")))
    return out


def with_delivery_headers(
    headers: object, now_ms: int, delay_ms: int | None, deliver_at_ms: int | None, ttl_ms: int | None,
) -> list[tuple[str, bytes | str | None]]:
    """`headers` (a list of pairs or a dict, or None) without any delivery header, plus the new ones."""
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    kept: list[tuple[str, bytes | str | None]] = [(k, v) for k, v in items if k not in _NAMES]  # type: ignore[attr-defined]
    return kept + list(delivery_headers(now_ms, delay_ms, deliver_at_ms, ttl_ms))
