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

Written behind, by one thread (`LogRegistry`). `create_log` runs on the broker's event loop (a
LeaderAndIsr naming 10,000 new partitions, the first start after topic ids came, when every log
adopts its id): writing the whole registry (and fsyncing it and the directory) per log there was
quadratic and blocked the loop. Now a change only updates a dict; a writer thread, started by the
first unwritten change and ending once all is written, writes the pending `partition.metadata` files
and then the registry at most every REGISTRY_WRITE_INTERVAL_MS (10,000 new logs: a few writes, not
10,000), and `LogManager.close_all` writes what is left. Why that is safe:

- The registry only lets a *vanished* directory be noticed. `Log.open` creates the directory before
  the log can take (or acknowledge) a record, so if the broker dies before the registry names a new
  log, the directory is still there on restart: it is loaded, and registered when next opened.
  Nothing is lost and nothing vanished unnoticed. Only a directory that vanishes within that interval
  *and* whose broker dies before the write goes unnoticed: an OS crash that loses the directory's
  (not yet fsynced) entry loses its records' pages too, which acknowledged data may (acks mean the
  page cache of min_insync_replicas replicas, as in Kafka); an operator would have to delete it in
  its first REGISTRY_WRITE_INTERVAL_MS.
- A `partition.metadata` not written yet is read from memory (`partition_metadata`), so identity
  checks see it at once. If the broker dies first, the log has no file on restart and adopts the
  topic's id again: the same id unless the topic was deleted and re-created while the broker was
  down, which then keeps at most one interval's records of a log created just before the crash
  (Kafka also writes this file asynchronously). A log is deleted only after
  `discard_partition_metadata`, which waits for a write into its directory that has started, so a
  write never lands in a renamed or re-created directory.

Bounds: the registry holds one entry per hosted log, so it is bounded by the partitions a broker
hosts (REGISTRY_LOGS_MAX refuses more, ~300 bytes each at most); the pending partition.metadata
writes are bounded by the open logs. A file larger than `REGISTRY_BYTES_MAX` or
`PARTITION_METADATA_BYTES_MAX` is treated as damaged.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from logbroker.errors import StorageError
from logbroker.storage.atomic_file import write_atomically

log = logging.getLogger(__name__)

PARTITION_METADATA_FILE = "partition.metadata"
REGISTRY_FILE = "log-registry.json"
IDENTITY_FILES = (PARTITION_METADATA_FILE, PARTITION_METADATA_FILE + ".tmp")  # in a log directory
PARTITION_METADATA_BYTES_MAX = 4096
REGISTRY_BYTES_MAX = 256 << 20
# One entry per hosted log, at most ~300 bytes (a 249-character topic name): 500,000 logs stay well
# under REGISTRY_BYTES_MAX, and far above what one broker can host (a log is a directory, an LMDB
# environment and a mapped segment).
REGISTRY_LOGS_MAX = 500_000
REGISTRY_WRITE_INTERVAL_MS = 100  # the writer thread writes at most this often (and on close)
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


def write_partition_metadata(directory: Path, topic_id: str,
                             write: Callable[[Path, bytes], None] | None = None) -> None:
    """Write `directory/partition.metadata` now (`write`: write_atomically unless given)."""
    if not valid_topic_id(topic_id):
        raise ValueError(f"topic id {topic_id!r} is not 32 hex digits")
    try:
        (write or write_atomically)(directory / PARTITION_METADATA_FILE,
                                    f"version: 0\ntopic_id: {topic_id}\n".encode())
    except OSError as e:
        raise StorageError(f"cannot write {directory / PARTITION_METADATA_FILE}: {e}") from e


# -- the registry of created logs, and the identity files written behind ----------------------------

class LogRegistry:
    """`log-registry.json` and the `partition.metadata` files not written yet: changed in memory by
    the LogManager's thread (a few dict operations under a lock, no I/O), written by `save()`, which
    the writer thread calls at most every `write_interval_ms` while something is unwritten, and
    `close()` calls once more. See the module docstring for why writing behind is safe."""

    def __init__(self, data_dir: Path, write_interval_ms: int = REGISTRY_WRITE_INTERVAL_MS,
                 write: Callable[[Path, bytes], None] | None = None) -> None:
        self.path = Path(data_dir) / REGISTRY_FILE
        self._write = write or write_atomically
        self._interval_s = max(0, write_interval_ms) / 1000
        self._lock = threading.Condition()  # guards everything below; never held during I/O
        self._logs: dict[Key, str] = self._load()
        self._version = self._saved_version = 0  # of `_logs`: unwritten changes when they differ
        self._pending: dict[Path, str] = {}  # log directory -> topic id its partition.metadata gets
        self._writing: Path | None = None  # the directory whose partition.metadata is being written
        self._save_lock = threading.Lock()  # one save at a time: an older snapshot never wins
        self._writer: threading.Thread | None = None
        self._closing = False
        self._failing = False

    def get(self, key: Key) -> str | None:
        """The topic id the log was created for ('' if unknown); None if it is not registered."""
        with self._lock:
            return self._logs.get(key)

    def items(self) -> list[tuple[Key, str]]:
        """Every registered log with its topic id ('' if unknown)."""
        with self._lock:
            return sorted(self._logs.items())

    def record(self, key: Key, topic_id: str) -> None:
        """Register a log (or learn its topic id); written behind, and only when something changed.
        StorageError beyond REGISTRY_LOGS_MAX logs (the file would be too large to read back)."""
        with self._lock:
            current = self._logs.get(key)
            if current is not None and (current == topic_id or not topic_id):
                return
            if current is None and len(self._logs) >= REGISTRY_LOGS_MAX:
                raise StorageError(f"{self.path}: more than {REGISTRY_LOGS_MAX} logs on one broker")
            self._logs[key] = topic_id
            self._version += 1
            self._start_writer()

    def forget(self, key: Key) -> None:
        with self._lock:
            if self._logs.pop(key, None) is not None:
                self._version += 1
                self._start_writer()

    # partition.metadata, written behind

    def partition_metadata(self, directory: Path) -> str | None:
        """The topic id of the log in `directory`: the one waiting to be written, else the file's
        (`read_partition_metadata`)."""
        with self._lock:
            pending = self._pending.get(directory)
        return pending if pending is not None else read_partition_metadata(directory)

    def stage_partition_metadata(self, directory: Path, topic_id: str) -> None:
        """`directory/partition.metadata` is to say `topic_id`: written behind, as the registry."""
        if not valid_topic_id(topic_id):
            raise ValueError(f"topic id {topic_id!r} is not 32 hex digits")
        with self._lock:
            self._pending[directory] = topic_id
            self._start_writer()

    def discard_partition_metadata(self, directory: Path) -> None:
        """The log in `directory` is about to be deleted: write nothing there any more (and wait for
        a write into it that has started: at most one small file)."""
        with self._lock:
            self._pending.pop(directory, None)
            self._lock.wait_for(lambda: self._writing != directory)

    # writing

    def save(self) -> None:
        """Write the pending partition.metadata files, then the registry if it changed. StorageError
        if a write fails (what failed stays pending). Called by the writer thread; callable anywhere."""
        with self._save_lock:
            with self._lock:
                pending = list(self._pending.items())
            for directory, topic_id in pending:
                self._save_partition_metadata(directory, topic_id)
            with self._lock:
                if self._version == self._saved_version:
                    return
                version, logs = self._version, dict(self._logs)
            data = json.dumps({"version": 0, "logs": {f"{t}-{p}": i for (t, p), i in sorted(logs.items())}})
            try:
                self._write(self.path, data.encode())
            except OSError as e:
                raise StorageError(f"cannot write {self.path}: {e}") from e
            with self._lock:
                self._saved_version = version

    def close(self) -> None:
        """Stop the writer thread and write what is pending (StorageError if that fails). A later
        change starts the writer again."""
        with self._lock:
            writer, self._closing = self._writer, True
            self._lock.notify_all()
        if writer is not None:
            writer.join()
        with self._lock:
            self._closing = False
        self.save()

    @property
    def unwritten(self) -> bool:
        with self._lock:
            return self._unwritten()

    def _unwritten(self) -> bool:
        return bool(self._pending) or self._version != self._saved_version

    def _start_writer(self) -> None:
        """Under the lock: something is unwritten; start the writer unless it runs (or is stopping)."""
        if self._writer is None and not self._closing:
            self._writer = threading.Thread(target=self._run, name="log-registry-writer", daemon=True)
            self._writer.start()

    def _run(self) -> None:
        """The writer thread: wait an interval (changes gather), save, until nothing is unwritten.
        A failing write is logged once per streak and retried every interval."""
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closing, timeout=self._interval_s)
                if self._closing:
                    self._writer = None
                    return  # close() saves
            try:
                self.save()
                if self._failing:
                    log.info("%s written again", self.path)
                self._failing = False
            except Exception as e:  # StorageError; anything else must not end the writer silently either
                if not self._failing:
                    log.error("%s (retried every %.0f ms)", e, self._interval_s * 1000)
                self._failing = True
            with self._lock:
                if self._closing or not self._unwritten():
                    self._writer = None
                    return

    def _save_partition_metadata(self, directory: Path, topic_id: str) -> None:
        with self._lock:
            if self._pending.get(directory) != topic_id:
                return  # superseded or discarded since the snapshot
            self._writing = directory
        try:
            if directory.is_dir():  # else the log vanished (the LogManager deletes only after discarding)
                write_partition_metadata(directory, topic_id, self._write)
        finally:
            with self._lock:
                self._writing = None
                if self._pending.get(directory) == topic_id:
                    del self._pending[directory]
                self._lock.notify_all()

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
