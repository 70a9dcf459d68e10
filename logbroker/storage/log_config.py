"""Per-log settings (Kafka's topic configs, units last) and the bounds they must keep.

Invariants: a LogConfig is immutable and every field is within the bounds `__post_init__` checks
(InvalidConfigError otherwise), so the log never sees a segment larger than a segment position can
address, nor an append larger than APPEND_BYTES_MAX.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

from logbroker.errors import InvalidConfigError
from logbroker.storage.compaction import CLEANUP_POLICIES, NO_LAG_LIMIT, CompactionSettings
from logbroker.storage.record_batch import HEADER_SIZE
from logbroker.storage.segment import POSITION_MAX

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
CREATE_TIME = "CreateTime"
LOG_APPEND_TIME = "LogAppendTime"
APPEND_BYTES_MAX = POSITION_MAX // 2  # one append's payload; the server bounds requests far lower


@dataclass(frozen=True)
class LogConfig:
    """Per-log settings (Kafka's topic configs with units last)."""

    segment_bytes: int = 128 << 20  # preallocated per partition: Redpanda's default, not Kafka's 1 GiB
    segment_ms: int = 7 * DAY_MS
    retention_ms: int = 7 * DAY_MS  # -1: unlimited
    retention_bytes: int = -1  # -1: unlimited
    max_message_bytes: int = 1 << 20  # largest batch accepted
    index_interval_bytes: int = 4096
    flush_interval_messages: int = -1  # -1: never fsync on a message count
    flush_interval_ms: int = -1  # -1: never fsync on time
    message_timestamp_type: str = CREATE_TIME  # or LogAppendTime
    index_map_bytes: int = 256 << 20  # LMDB map size per partition
    # compaction (storage/compaction.py), Kafka's defaults
    cleanup_policy: str = "delete"  # or compact, or compact,delete
    min_cleanable_dirty_ratio: float = 0.5
    min_compaction_lag_ms: int = 0
    max_compaction_lag_ms: int = NO_LAG_LIMIT
    delete_retention_ms: int = DAY_MS
    # idempotent producers (producer_state.py): a producer id idle this long is forgotten (Kafka's
    # producer.id.expiration.ms)
    producer_id_expiration_ms: int = DAY_MS

    def __post_init__(self) -> None:
        checks = [
            (HEADER_SIZE <= self.segment_bytes <= POSITION_MAX // 2, "segment_bytes", self.segment_bytes),
            (self.segment_ms >= 1, "segment_ms", self.segment_ms),
            (self.retention_ms >= -1, "retention_ms", self.retention_ms),
            (self.retention_bytes >= -1, "retention_bytes", self.retention_bytes),
            (HEADER_SIZE <= self.max_message_bytes <= APPEND_BYTES_MAX, "max_message_bytes", self.max_message_bytes),
            (self.index_interval_bytes >= 0, "index_interval_bytes", self.index_interval_bytes),
            (self.flush_interval_messages >= -1, "flush_interval_messages", self.flush_interval_messages),
            (self.flush_interval_ms >= -1, "flush_interval_ms", self.flush_interval_ms),
            (self.message_timestamp_type in (CREATE_TIME, LOG_APPEND_TIME), "message_timestamp_type",
             self.message_timestamp_type),
            (1 << 20 <= self.index_map_bytes <= 1 << 40, "index_map_bytes", self.index_map_bytes),
            (self.cleanup_policy in CLEANUP_POLICIES, "cleanup_policy", self.cleanup_policy),
            (0.0 <= self.min_cleanable_dirty_ratio <= 1.0, "min_cleanable_dirty_ratio",
             self.min_cleanable_dirty_ratio),
            (0 <= self.min_compaction_lag_ms <= NO_LAG_LIMIT, "min_compaction_lag_ms", self.min_compaction_lag_ms),
            (1 <= self.max_compaction_lag_ms <= NO_LAG_LIMIT, "max_compaction_lag_ms", self.max_compaction_lag_ms),
            (0 <= self.delete_retention_ms <= NO_LAG_LIMIT, "delete_retention_ms", self.delete_retention_ms),
            (1 <= self.producer_id_expiration_ms <= NO_LAG_LIMIT, "producer_id_expiration_ms",
             self.producer_id_expiration_ms),
        ]
        for ok, name, value in checks:
            if not ok:
                raise InvalidConfigError(f"log config {name}={value!r} is out of bounds")

    @classmethod
    def from_topic_config(cls, config: dict[str, str], base: LogConfig | None = None) -> LogConfig:
        """A LogConfig from topic config strings (metadata.TOPIC_CONFIG_DEFAULTS keys; Kafka's
        dotted names work too). Keys it does not use are ignored; missing ones come from `base`
        (the broker's defaults) or the class defaults."""
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        names = {f.name for f in fields(cls)}
        for raw_key, raw in config.items():
            key = raw_key.replace(".", "_")
            if key not in names:
                continue
            if key in _STRING_FIELDS:
                values[key] = raw.replace(" ", "")
                continue
            if key == "min_cleanable_dirty_ratio":
                try:
                    values[key] = float(raw)
                except (TypeError, ValueError):
                    raise InvalidConfigError(f"{raw_key} must be a number, got {raw!r}") from None
                continue
            try:
                values[key] = int(raw)
            except (TypeError, ValueError):
                raise InvalidConfigError(f"{raw_key} must be an integer, got {raw!r}") from None
        return cls(**values)

    @property
    def compaction(self) -> CompactionSettings:
        return CompactionSettings(self.min_cleanable_dirty_ratio, self.min_compaction_lag_ms,
                                  self.max_compaction_lag_ms, self.delete_retention_ms)


_STRING_FIELDS = ("message_timestamp_type", "cleanup_policy")


def with_segment_bytes(config: LogConfig, segment_bytes: int | None) -> LogConfig:
    """`config` with a checkpointed segment size, if there is one and it is within bounds."""
    if segment_bytes is None or segment_bytes == config.segment_bytes:
        return config
    try:
        return replace(config, segment_bytes=segment_bytes)
    except InvalidConfigError:
        log.warning("ignoring checkpointed segment_bytes %d (out of bounds)", segment_bytes)
        return config
