"""Every partition log under one data directory.

Layout::

    <data dir>/<topic>-<partition>/                  one Log (see log.py)
    <data dir>/<topic>-<partition>.<uuid>-delete/    a log being deleted: removed, never loaded
    <data dir>/log-registry.json                     the logs this broker created (log_identity.py;
                                                     written behind by a thread, and by close_all)

Anything else in the data directory (the metadata store's files, strays) is left alone.

The logs share one `SegmentFlusher`: a single background thread that fsyncs rolled segments (see
flusher.py), with a bounded queue.

Topic ids (log_identity.py): `create_log` with the topic's id deletes a log of another incarnation of
the topic and refuses (`LostLogError`) to recreate, unasked, a registered log whose directory vanished.

Deleting renames the directory first, then removes it, so a crash midway cannot bring a deleted
partition back: `load_all` finishes the removal.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from logbroker.cluster.metadata import PARTITIONS_MAX, validate_topic_name
from logbroker.errors import InvalidPartitionsError, InvalidTopicError, StorageError
from logbroker.storage.flusher import SegmentFlusher
from logbroker.storage.log import DELETE_SUFFIX, Log, LogConfig, remove_log_dir, wall_clock_ms
from logbroker.storage.log_identity import (
    REGISTRY_WRITE_INTERVAL_MS,
    Identity,
    LogRegistry,
    LostLogError,
    check_identity,
    was_lost,
)

log = logging.getLogger(__name__)

_DELETED_DIR = re.compile(r".+-\d+\.[0-9a-f]{32}" + re.escape(DELETE_SUFFIX))


class LogManager:
    """Opens, creates, deletes and closes the logs of one broker. Owned by one thread."""

    def __init__(
        self, data_dir: Path, default_config: LogConfig, now_ms: Callable[[], int] = wall_clock_ms,
        flusher: SegmentFlusher | None = None, registry_write_interval_ms: int = REGISTRY_WRITE_INTERVAL_MS,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.default_config = default_config
        self._now_ms = now_ms
        self._owns_flusher = flusher is None
        self.flusher = flusher if flusher is not None else SegmentFlusher(name="segment-flush")
        self._logs: dict[tuple[str, int], Log] = {}
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create data directory {self.data_dir}: {e}") from e
        self.registry = LogRegistry(self.data_dir, registry_write_interval_ms)  # written behind: log_identity.py

    def lost_logs(self) -> list[tuple[str, int, str]]:
        """(topic, partition, topic id) of every log this broker created whose directory is gone."""
        return [(t, p, topic_id) for (t, p), topic_id in self.registry.items()
                if (t, p) not in self._logs and not self._path(t, p).exists()]

    def load_all(self, configs: Mapping[str, LogConfig] | None = None) -> dict[tuple[str, int], Log]:
        """Open every `<topic>-<partition>` directory and finish interrupted deletions. Returns the
        logs now open. A log opens with `configs[topic]` if given; else with the default config
        and the segment size the log checkpointed when last open (its topic's, so a restart does
        not preallocate the default size: see Log.open)."""
        configs = configs or {}
        for entry in sorted(self.data_dir.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            if _DELETED_DIR.fullmatch(entry.name):
                log.info("removing %s (deletion interrupted)", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            key = parse_log_dir_name(entry.name)
            if key is None or key in self._logs:
                continue
            config = configs.get(key[0])
            self._logs[key] = Log.open(entry, config or self.default_config, self._now_ms, self.flusher,
                                       segment_bytes_from_checkpoint=config is None)
        return dict(self._logs)

    def create_log(self, topic: str, partition: int, config: LogConfig | None = None, topic_id: str = "",
                   *, accept_loss: bool = False) -> Log:
        """The log of a partition, opened (created if missing); the open one if already open.

        With the topic's `topic_id`: a log of another id is deleted (WARN) and an empty one created;
        a log without one adopts it; a registered log whose directory is gone raises LostLogError
        unless `accept_loss` (then it is created empty)."""
        key = (topic, partition)
        existing = self._logs.get(key)
        if existing is not None and self._keeps_identity(key, existing, topic_id):
            return existing
        path = self._path(topic, partition)
        if not accept_loss and not path.exists() and was_lost(self.registry.get(key), topic_id):
            raise LostLogError(f"the log of {topic}-{partition} is missing: this broker created {path} and "
                               f"it is gone")
        opened = Log.open(path, config or self.default_config, self._now_ms, self.flusher)
        self._logs[key] = opened
        if not self._keeps_identity(key, opened, topic_id):  # a directory left there, not loaded
            opened = Log.open(path, config or self.default_config, self._now_ms, self.flusher)
            self._logs[key] = opened
            self._keeps_identity(key, opened, topic_id)
        return opened

    def _keeps_identity(self, key: tuple[str, int], opened: Log, topic_id: str) -> bool:
        """Whether the open log may serve topic id `topic_id`; if not it is deleted (and forgotten)."""
        stored = self.registry.partition_metadata(opened.directory)
        if check_identity(stored, topic_id) is not Identity.MISMATCH:
            if stored is None and topic_id:
                self.registry.stage_partition_metadata(opened.directory, topic_id)
            self.registry.record(key, topic_id or stored or "")
            return True
        log.warning("deleting the log in %s: it belongs to topic id %s, but topic %s is now id %s (the topic "
                    "was deleted and created again)", opened.directory, stored, key[0], topic_id)
        del self._logs[key]
        self.registry.discard_partition_metadata(opened.directory)
        opened.delete()
        self.registry.forget(key)
        return False

    def get_log(self, topic: str, partition: int) -> Log | None:
        return self._logs.get((topic, partition))

    def delete_log(self, topic: str, partition: int) -> bool:
        """Close and remove a partition's log (open or not). Returns whether there was one."""
        opened = self._logs.pop((topic, partition), None)
        if opened is not None:
            self.registry.discard_partition_metadata(opened.directory)
            opened.delete()
            self.registry.forget((topic, partition))
            return True
        path = self._path(topic, partition)
        self.registry.forget((topic, partition))
        if not path.exists():
            return False
        self.registry.discard_partition_metadata(path)
        remove_log_dir(path)
        return True

    def logs(self) -> dict[tuple[str, int], Log]:
        return dict(self._logs)

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Retention on every log; returns segments deleted. A failing log is logged and skipped."""
        now = self._now_ms() if now_ms is None else now_ms
        deleted = 0
        for key, plog in list(self._logs.items()):
            try:
                deleted += plog.enforce_retention(now)
            except StorageError as e:
                log.error("retention of %s-%d failed: %s", key[0], key[1], e)
        return deleted

    def checkpoint_high_watermarks(self) -> int:
        """Checkpoint the high watermark of every log whose one moved since (one small index write
        each; see Log.checkpoint_high_watermark). A failing log is logged and skipped. Returns how
        many were written."""
        written = 0
        for key, plog in list(self._logs.items()):
            try:
                written += plog.checkpoint_high_watermark()
            except StorageError as e:
                log.error("high watermark checkpoint of %s-%d failed: %s", key[0], key[1], e)
        return written

    def flush_all(self) -> None:
        for plog in self._logs.values():
            if not plog.is_offline:
                plog.flush()

    def close_all(self) -> None:
        """Close every log cleanly (each one is attempted even if another fails; each waits for its
        pending segment flushes), then stop the flush thread (a later roll starts it again), then
        write the registry and partition.metadata files still pending and stop their writer thread."""
        failures = []
        for key, plog in list(self._logs.items()):
            try:
                plog.close()
            except StorageError as e:
                failures.append(f"{key[0]}-{key[1]}: {e}")
        self._logs.clear()
        if self._owns_flusher:
            self.flusher.shutdown(wait=False)  # flushes of abandoned logs run on in the background
        try:
            self.registry.close()
        except StorageError as e:
            failures.append(str(e))
        if failures:
            raise StorageError("; ".join(failures))

    def _path(self, topic: str, partition: int) -> Path:
        validate_topic_name(topic)
        if not 0 <= partition < PARTITIONS_MAX:
            raise InvalidPartitionsError(f"partition {partition} is outside [0, {PARTITIONS_MAX})")
        path = self.data_dir / f"{topic}-{partition}"
        root = self.data_dir.resolve()
        if path.resolve().parent != root:
            raise InvalidTopicError(f"topic {topic!r} would put its log outside {root}")
        return path


def parse_log_dir_name(name: str) -> tuple[str, int] | None:
    """(topic, partition) of a log directory name, or None if it is not one."""
    topic, sep, partition = name.rpartition("-")
    if not sep or not (partition.isascii() and partition.isdigit()) or (len(partition) > 1 and partition[0] == "0"):
        return None
    try:
        validate_topic_name(topic)
    except InvalidTopicError:
        return None
    p = int(partition)
    return (topic, p) if p < PARTITIONS_MAX else None
