"""The log cleaner's checkpoint: each compacted log's first dirty offset, kept across restarts
(Kafka's cleaner-offset-checkpoint), so a restarted broker does not clean every log again.

``<data dir>/cleaner-offset-checkpoint``, utf-8 JSON, written atomically (atomic_file.py: temp
file, fsync, rename, fsync the directory)::

    {"version": 0,
     "logs": [{"topic": "<name>", "partition": <int>, "topic_id": "<32 hex digits, or ''>",
               "first_dirty_offset": <int >= 0>}, ...]}

- an entry holds for the log of that topic, partition AND topic id (log_identity.py's
  `partition.metadata`; '' for a log that has none): a topic deleted and created again has
  another id, so its new log does not inherit the old one's offset;
- `first_dirty_offset`: every offset below it has been cleaned at least once (compaction.py);
- written by `LogCleaner` after each pass that moved an offset, with an entry per log present
  then (entries of logs no longer present are dropped); read once, when the cleaner is built.

A missing file is an empty checkpoint. A damaged one (bad JSON, a wrong field) is ignored with a
warning: losing it costs one extra pass per log and changes no record. At most `ENTRIES_MAX`
entries and `FILE_BYTES_MAX` bytes are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from logbroker.storage.atomic_file import write_atomically

log = logging.getLogger(__name__)

FILE_NAME = "cleaner-offset-checkpoint"
VERSION = 0
ENTRIES_MAX = 1 << 20
FILE_BYTES_MAX = 256 << 20

Key = tuple[str, int]


class Entry(NamedTuple):
    topic_id: str  # '' when the log has none
    first_dirty_offset: int


def encode(entries: Mapping[Key, Entry]) -> bytes:
    logs = [{"topic": t, "partition": p, "topic_id": e.topic_id, "first_dirty_offset": e.first_dirty_offset}
            for (t, p), e in sorted(entries.items())]
    return json.dumps({"version": VERSION, "logs": logs}, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[Key, Entry]:
    """The entries of a checkpoint file's contents; ValueError if they are not the layout above."""
    doc = json.loads(raw.decode())
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("logs"), list):
        raise ValueError("not a version 0 checkpoint")
    if len(doc["logs"]) > ENTRIES_MAX:
        raise ValueError(f"more than {ENTRIES_MAX} entries")
    out: dict[Key, Entry] = {}
    for e in doc["logs"]:
        if not isinstance(e, dict):
            raise ValueError(f"entry {e!r} is not an object")
        topic, partition, topic_id, offset = (e.get("topic"), e.get("partition"), e.get("topic_id"),
                                              e.get("first_dirty_offset"))
        if not (isinstance(topic, str) and isinstance(topic_id, str) and type(partition) is int
                and type(offset) is int and partition >= 0 and offset >= 0):
            raise ValueError(f"bad entry {e!r}")
        out[(topic, partition)] = Entry(topic_id, offset)
    return out


def read_checkpoint(path: Path) -> dict[Key, Entry]:
    """The checkpoint at `path`; empty if there is none or it is damaged (module doc)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("cannot read %s (every compacted log counts as dirty): %s", path, e)
        return {}
    try:
        if len(raw) > FILE_BYTES_MAX:
            raise ValueError(f"larger than {FILE_BYTES_MAX} bytes")
        return decode(raw)
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("ignoring the damaged %s (every compacted log counts as dirty): %s", path, e)
        return {}


def write_checkpoint(path: Path, entries: Mapping[Key, Entry]) -> None:
    write_atomically(path, encode(entries))
