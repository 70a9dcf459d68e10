"""Which topic a partition log belongs to, and which logs this broker has created.

A topic name can be deleted and created again; a topic *id* (uuid4 hex, as Kafka's topic id) names
one incarnation. Two small files, each written atomically (temp file, fsync, rename, fsync the
directory), tie logs to it:

``<data dir>/<topic>-<partition>/partition.metadata`` (as Kafka's), utf-8 text::

    version: 0
    topic_id: 5f0c1e2d9a8b47c6b3a2918f7e6d5c4b

``<data dir>/log-registry.json``: every log this broker has created and not deleted::

    {"version": 0, "logs": {"<topic>-<partition>": "<topic id, or '' if not known yet>"}}

Rules (pure functions below; `LogManager` applies them):

- opening a log for a topic id: no `partition.metadata` (a log from before topic ids) -> adopt it,
  writing the id; the same id -> serve it; another id -> the log belongs to a deleted incarnation
  of the topic: delete it (WARN) and start an empty one.
- a log directory that is missing although the registry lists it for the same topic id (or either
  id is unknown) was lost, not never created: `LostLogError`, never a silent empty re-creation.

Bounds: the registry holds one entry per hosted log (at most PARTITIONS_MAX per topic); a file
larger than `REGISTRY_BYTES_MAX` or `PARTITION_METADATA_BYTES_MAX` is treated as damaged.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
from pathlib import Path

from logbroker.errors import StorageError

log = logging.getLogger(__name__)

PARTITION_METADATA_FILE = "partition.metadata"
REGISTRY_FILE = "log-registry.json"
IDENTITY_FILES = (PARTITION_METADATA_FILE, PARTITION_METADATA_FILE + ".tmp")  # in a log directory
PARTITION_METADATA_BYTES_MAX = 4096
REGISTRY_BYTES_MAX = 256 << 20
_TOPIC_ID = re.compile(r"[0-9a-f]{32}")

Key = tuple[str, int]


class LostLogError(StorageError):
    """A log this broker created (for this topic id) has vanished from the disk."""


class Identity(enum.Enum):
    MATCH = "match"        # the log carries the expected id (or there is nothing to check against)
    ADOPT = "adopt"        # the log carries no id (older than topic ids): it takes the expected one
    MISMATCH = "mismatch"  # the log belongs to another incarnation of the topic


def check_identity(stored_id: str | None, expected_id: str) -> Identity:
    """What to do with a log whose `partition.metadata` says `stored_id` (None: no file) when the
    metadata says the topic's id is `expected_id` ('' : not known, nothing to check)."""
    if not expected_id:
        return Identity.MATCH
    if not stored_id:
        return Identity.ADOPT
    return Identity.MATCH if stored_id == expected_id else Identity.MISMATCH


def was_lost(registered_id: str | None, expected_id: str) -> bool:
    """Whether a missing log directory is a loss: the registry lists it (`registered_id` not None)
    for this topic id, or one of the two ids is unknown (so it may well be this topic's)."""
    if registered_id is None:
        return False
    return not registered_id or not expected_id or registered_id == expected_id


def valid_topic_id(topic_id: str) -> bool:
    return bool(_TOPIC_ID.fullmatch(topic_id))


# -- partition.metadata -----------------------------------------------------------------------------

def read_partition_metadata(directory: Path) -> str | None:
    """The topic id in `directory/partition.metadata`; None if there is no such file. A damaged
    file raises StorageError (the log is not served on a guess)."""
    path = directory / PARTITION_METADATA_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(PARTITION_METADATA_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}") from e
    fields: dict[str, str] = {}
    try:
        for line in raw.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip()] = value.strip()
    except UnicodeDecodeError:
        fields = {}
    topic_id = fields.get("topic_id", "")
    if len(raw) > PARTITION_METADATA_BYTES_MAX or fields.get("version") != "0" or not valid_topic_id(topic_id):
        raise StorageError(f"{path} is damaged (expected 'version: 0' and a 32-hex-digit topic_id)")
    return topic_id


def write_partition_metadata(directory: Path, topic_id: str) -> None:
    if not valid_topic_id(topic_id):
        raise ValueError(f"topic id {topic_id!r} is not 32 hex digits")
    try:
        write_atomically(directory / PARTITION_METADATA_FILE, f"version: 0\ntopic_id: {topic_id}\n".encode())
    except OSError as e:
        raise StorageError(f"cannot write {directory / PARTITION_METADATA_FILE}: {e}") from e


# -- the registry of created logs -------------------------------------------------------------------

class LogRegistry:
    """`log-registry.json`: the logs this broker created. Owned by the LogManager's thread."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / REGISTRY_FILE
        self._logs: dict[Key, str] = self._load()

    def get(self, key: Key) -> str | None:
        """The topic id the log was created for ('' if unknown); None if it is not registered."""
        return self._logs.get(key)

    def record(self, key: Key, topic_id: str) -> None:
        """Register a log (or learn its topic id); written only when something changed."""
        current = self._logs.get(key)
        if current is not None and (current == topic_id or not topic_id):
            return
        self._logs[key] = topic_id
        self._save()

    def items(self) -> list[tuple[Key, str]]:
        """Every registered log with its topic id ('' if unknown)."""
        return sorted(self._logs.items())

    def forget(self, key: Key) -> None:
        if self._logs.pop(key, None) is not None:
            self._save()

    def _load(self) -> dict[Key, str]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(REGISTRY_BYTES_MAX + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StorageError(f"cannot read {self.path}: {e}") from e
        try:
            if len(raw) > REGISTRY_BYTES_MAX:
                raise ValueError("too large")
            d = json.loads(raw)
            out: dict[Key, str] = {}
            for name, topic_id in d["logs"].items():
                topic, _, partition = str(name).rpartition("-")
                out[(topic, int(partition))] = str(topic_id)
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Without it a vanished log is not noticed, but every present log is re-registered.
            log.error("%s is damaged (%s); starting a new one from the logs present", self.path, e)
            return {}

    def _save(self) -> None:
        logs = {f"{t}-{p}": i for (t, p), i in sorted(self._logs.items())}
        try:
            write_atomically(self.path, json.dumps({"version": 0, "logs": logs}).encode())
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e}") from e


def write_atomically(path: Path, data: bytes) -> None:
    """Small metadata file: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
