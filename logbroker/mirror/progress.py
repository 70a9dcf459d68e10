"""The mirror's progress, stored in the target: one header on every mirrored record (pure).

Header `logbroker.mirror.src`, value ASCII `<source partition>:<source offset>` (e.g. b"3:1042"):
the record's place in the source cluster. A source record from partition p always goes to target
partition p, and the idempotent producer keeps each partition's records in order, so the last
record of a target partition tells where copying stopped: the mirror resumes at its source offset
+ 1. This survives kill -9 with neither loss nor duplicates, whatever the source group committed
(its commits are only a hint, used when the target partition holds no mirrored record).

A source record that already carries the header (a chain A -> B -> C) has it replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

SRC_HEADER = "logbroker.mirror.src"
MAX_HEADER_BYTES = 64


def decode(value: bytes | None) -> tuple[int, int] | None:
    """(partition, offset), or None when the value is not one of ours."""
    if value is None or len(value) > MAX_HEADER_BYTES:
        return None
    part, sep, off = value.partition(b":")
    if not sep or not part.isdigit() or not off.isdigit():
        return None
    return int(part), int(off)


def source_position(headers: Sequence[tuple[str, bytes | None]], partition: int) -> int | None:
    """The source offset of a mirrored record of `partition` (None: not mirrored, or from another)."""
    for name, value in reversed(headers):
        if name == SRC_HEADER:
            found = decode(value)
            if found is not None and found[0] == partition:
                return found[1]
            return None
    return None


def with_source(headers: Sequence[tuple[str, bytes | None]], partition: int,
                offset: int) -> list[tuple[str, bytes | None]]:
    """The record's headers for the target: any earlier mirror header replaced by ours (last)."""
    tag = (SRC_HEADER, b"%d:%d" % (partition, offset))
    if not headers:
        return [tag]
    for h in headers:
        if h[0] == SRC_HEADER:
            return [*(x for x in headers if x[0] != SRC_HEADER), tag]
    return [*headers, tag]
