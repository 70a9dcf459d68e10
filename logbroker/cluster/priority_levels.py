"""Priority levels of a topic: where a record of priority P lives, and the two topic configs.

A topic created with `priority_levels=N` (1..PRIORITY_LEVELS_MAX; 1, the default, is a topic
without levels) holds its priority-0 records in its own log and those of priority k (1..N-1) in a
hidden internal topic per level, `level_topic(topic, k)` = ``__priority.<k>.<topic>``, created before
and deleted after the topic, with the same partition count and replication factor. So producing
stays an append: the producer sends a record of priority k, key hashed as usual, to the same
partition number of level k's topic. The `__priority.` prefix is reserved: a user topic may not
start with it, and level topics are left out of topic lists (they are named only explicitly).

`priority_weights` ("w0,w1,...", one positive integer per level, level 0 first; empty = strict)
makes share groups drain the levels by weight instead of strictly highest first
(group/priority_drain.py).
"""

from __future__ import annotations

from logbroker.errors import InvalidConfigError

PRIORITY_LEVELS_MAX = 10
LEVEL_PREFIX = "__priority."
WEIGHT_MAX = 1000
_LEVEL_NAME_CHARS = len(LEVEL_PREFIX) + 2  # "__priority." + digit + "."


def level_topic(topic: str, level: int) -> str:
    """The log of `topic`'s records of priority `level` (level 0: the topic itself)."""
    return topic if level == 0 else f"{LEVEL_PREFIX}{level}.{topic}"


def parse_level_topic(name: str) -> tuple[str, int]:
    """(user topic, level) of a log name: (name, 0) for a topic that is not a level topic."""
    if name.startswith(LEVEL_PREFIX) and len(name) > _LEVEL_NAME_CHARS and name[_LEVEL_NAME_CHARS - 1] == "." \
            and name[len(LEVEL_PREFIX)].isdigit() and name[len(LEVEL_PREFIX)] != "0":
        return name[_LEVEL_NAME_CHARS:], int(name[len(LEVEL_PREFIX)])
    return name, 0


def is_level_topic(name: str) -> bool:
    return name.startswith(LEVEL_PREFIX)


def max_user_topic_chars(topic_name_max_chars: int) -> int:
    return topic_name_max_chars - _LEVEL_NAME_CHARS


def parse_levels(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InvalidConfigError(f"priority_levels must be an integer, got {value!r}") from None
    if not 1 <= n <= PRIORITY_LEVELS_MAX:
        raise InvalidConfigError(f"priority_levels={n} is outside [1, {PRIORITY_LEVELS_MAX}]")
    return n


def parse_weights(value: str, levels: int) -> tuple[int, ...]:
    """The weights of `priority_weights` (() when empty: strict), one per level, each 1..WEIGHT_MAX."""
    if not value.strip():
        return ()
    try:
        weights = tuple(int(w) for w in value.split(","))
    except ValueError:
        raise InvalidConfigError(f"priority_weights must be comma-separated integers, got {value!r}") from None
    if len(weights) != levels:
        raise InvalidConfigError(f"priority_weights has {len(weights)} weights; the topic has {levels} priority levels")
    if any(not 1 <= w <= WEIGHT_MAX for w in weights):
        raise InvalidConfigError(f"priority_weights must each be in [1, {WEIGHT_MAX}], got {value!r}")
    return weights


def check_priority_config(config: dict[str, str]) -> None:
    """Both configs together (called by normalize_topic_config)."""
    levels = parse_levels(config.get("priority_levels", "1"))
    parse_weights(config.get("priority_weights", ""), levels)
