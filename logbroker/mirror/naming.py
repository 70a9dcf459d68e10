"""Which source topics a mirror copies, and their names on the target (pure).

A topic is mirrored when its whole name matches the `--topics` regex, it is not internal ("__"
prefix), and it is not a remote topic of the target: with `--target-alias B`, a topic named
`B.<anything>` is the target's own data mirrored here and is never mirrored back (active-active
loop prevention, as MirrorMaker 2's DefaultReplicationPolicy). On the target a topic keeps its name,
or with `--prefix A` becomes `A.<name>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SEPARATOR = "."
ALIAS_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_alias(alias: str, flag: str) -> str:
    """A cluster alias: letters, digits, '_' and '-' (no separator), at most 64 characters."""
    if not ALIAS_RE.fullmatch(alias):
        raise ValueError(f"{flag} must be 1-64 letters, digits, '_' or '-', got {alias!r}")
    return alias


def target_topic(topic: str, prefix: str | None) -> str:
    return f"{prefix}{SEPARATOR}{topic}" if prefix else topic


def is_remote(topic: str, alias: str | None) -> bool:
    """Whether `topic` is a copy of cluster `alias`'s topic (it carries that alias as its prefix)."""
    return bool(alias) and topic.startswith(f"{alias}{SEPARATOR}")


def mirrored_topics(topics: Iterable[str], pattern: re.Pattern[str], prefix: str | None,
                    target_alias: str | None) -> list[str]:
    """The source topics to copy, sorted.

    A topic carrying the target's alias came from the target: never back. A topic carrying our own
    prefix would become `A.A.x` on the target: a loop through a third cluster, skipped too.
    """
    out = []
    for t in topics:
        if t.startswith("__") or not pattern.fullmatch(t):
            continue
        if is_remote(t, target_alias) or is_remote(t, prefix):
            continue
        out.append(t)
    return sorted(set(out))
