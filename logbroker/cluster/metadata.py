"""Cluster metadata: what a topic is, and the rules its names and configs follow.

Topic names follow Kafka's rules: 1-249 characters of [A-Za-z0-9._-], and not "." or "..". A name is
checked before anything touches the disk, so no name can ever become a path outside the data dir.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from logbroker.cluster.lineage import Split
from logbroker.cluster.priority_levels import PRIORITY_LEVELS_MAX, check_priority_config
from logbroker.errors import InvalidConfigError, InvalidGroupIdError, InvalidTopicError

TOPIC_NAME_MAX_CHARS = 249
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")
PARTITIONS_MAX = 10_000
LOST_REPLICAS_REGISTERED_MAX = 5000  # in a broker registration (a znode is at most 1 MiB)


def validate_topic_name(name: str) -> None:
    if not name:
        raise InvalidTopicError("topic name is empty")
    if len(name) > TOPIC_NAME_MAX_CHARS:
        raise InvalidTopicError(f"topic name is {len(name)} characters, the limit is {TOPIC_NAME_MAX_CHARS}")
    if name in (".", ".."):
        raise InvalidTopicError(f"topic name {name!r} is not allowed")
    if not _TOPIC_NAME.fullmatch(name):
        raise InvalidTopicError(f"topic name {name!r} may only contain ASCII letters, digits, '.', '_' and '-'")


GROUP_ID_MAX_CHARS = 249


def validate_group_id(group_id: str) -> None:
    """Consumer group ids: 1-249 characters, not "." or "..", no "/" or NUL (they name znodes)."""
    if not group_id or group_id in (".", "..") or "/" in group_id or "\x00" in group_id \
            or len(group_id) > GROUP_ID_MAX_CHARS:
        raise InvalidGroupIdError(f"group id {group_id!r} is not valid (1-{GROUP_ID_MAX_CHARS} characters, no '/')")


# Per-topic settings and their defaults (Kafka's names with units last).
TOPIC_CONFIG_DEFAULTS: dict[str, str] = {
    "cleanup_policy": "delete",
    "retention_ms": str(7 * 24 * 3600 * 1000),
    "retention_bytes": "-1",
    "segment_bytes": str(128 << 20),
    "segment_ms": str(7 * 24 * 3600 * 1000),
    "max_message_bytes": str(1 << 20),
    "index_interval_bytes": "4096",
    "flush_interval_messages": "-1",
    "flush_interval_ms": "-1",
    "min_insync_replicas": "1",
    "message_timestamp_type": "CreateTime",
    # compaction (storage/compaction.py): Kafka's defaults
    "min_cleanable_dirty_ratio": "0.5",
    "min_compaction_lag_ms": "0",
    "max_compaction_lag_ms": str((1 << 63) - 1),
    "delete_retention_ms": str(24 * 3600 * 1000),
    # queues (group/share_partition.py): a record not settled this long after it became
    # deliverable is never handed to a share group again (-1: no limit)
    "message_ttl_ms": "-1",
    # priority (cluster/priority_levels.py): levels 1..10 (1: none); weights per level, "" = strict
    "priority_levels": "1",
    "priority_weights": "",
    # idempotent producers (storage/producer_state.py): a producer id idle this long is forgotten
    "producer_id_expiration_ms": str(24 * 3600 * 1000),
    # growing the topic (cluster/lineage.py): "true" records split points and refuses a batch with a
    # key that hashes elsewhere now (per-key order across the growth); "false": Kafka's behaviour
    # (explicitly partitioned keyed records are then accepted anywhere)
    "key_order_on_growth": "true",
}

_INT_CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "retention_ms": (-1, 1 << 62),
    "retention_bytes": (-1, 1 << 62),
    "segment_bytes": (1 << 14, 1 << 31),
    "segment_ms": (1, 1 << 62),
    "max_message_bytes": (64, 1 << 30),
    "index_interval_bytes": (0, 1 << 30),
    "flush_interval_messages": (-1, 1 << 62),
    "flush_interval_ms": (-1, 1 << 62),
    "min_insync_replicas": (1, 100),
    "min_compaction_lag_ms": (0, (1 << 63) - 1),
    "max_compaction_lag_ms": (1, (1 << 63) - 1),
    "delete_retention_ms": (0, (1 << 63) - 1),
    "message_ttl_ms": (-1, 365 * 24 * 3600 * 1000),
    "priority_levels": (1, PRIORITY_LEVELS_MAX),
    "producer_id_expiration_ms": (1, 1 << 62),
}
_ENUM_CONFIG: dict[str, tuple[str, ...]] = {
    "cleanup_policy": ("delete", "compact", "compact,delete", "delete,compact"),
    "message_timestamp_type": ("CreateTime", "LogAppendTime"),
    "key_order_on_growth": ("true", "false"),
}


def normalize_topic_config(config: dict[str, str]) -> dict[str, str]:
    """Validated config with defaults filled in. Accepts Kafka's dotted names (retention.ms) too."""
    out = dict(TOPIC_CONFIG_DEFAULTS)
    for raw_key, value in config.items():
        key = raw_key.replace(".", "_")
        if key not in TOPIC_CONFIG_DEFAULTS:
            raise InvalidConfigError(f"unknown topic config {raw_key!r}")
        if key == "min_cleanable_dirty_ratio":
            try:
                ratio = float(value)
            except ValueError:
                raise InvalidConfigError(f"{raw_key} must be a number, got {value!r}") from None
            if not 0.0 <= ratio <= 1.0:
                raise InvalidConfigError(f"{raw_key}={value} is outside [0, 1]")
            out[key] = str(ratio)
        elif key == "priority_weights":
            out[key] = value.replace(" ", "")
        elif key in _INT_CONFIG_BOUNDS:
            lo, hi = _INT_CONFIG_BOUNDS[key]
            try:
                n = int(value)
            except ValueError:
                raise InvalidConfigError(f"{raw_key} must be an integer, got {value!r}") from None
            if not lo <= n <= hi:
                raise InvalidConfigError(f"{raw_key}={n} is outside [{lo}, {hi}]")
            out[key] = str(n)
        else:
            if value not in _ENUM_CONFIG[key]:
                raise InvalidConfigError(f"{raw_key} must be one of {', '.join(_ENUM_CONFIG[key])}")
            out[key] = value
    check_priority_config(out)
    return out


@dataclass
class TopicSpec:
    """A topic as the metadata store keeps it: replica assignment per partition, and its config."""

    name: str
    assignment: dict[int, list[int]]
    config: dict[str, str] = field(default_factory=dict)
    topic_id: str = ""
    # While a reassignment is in flight (cluster mode): replicas being added / to be removed, per
    # partition. `assignment` then holds the union; both are empty otherwise.
    adding_replicas: dict[int, list[int]] = field(default_factory=dict)
    removing_replicas: dict[int, list[int]] = field(default_factory=dict)
    # Where the topic grew, oldest first (cluster/lineage.py): the lineage of its newer partitions.
    splits: list[Split] = field(default_factory=list)

    @property
    def partition_count(self) -> int:
        return len(self.assignment)


@dataclass
class PartitionStateData:
    """Leader and ISR of one partition, as the controller (and, for ISR changes, the leader) writes it.

    Stored as JSON in ZooKeeper at /topics/<topic>/partitions/<p>/state; `zk_version` is that znode's
    version (not serialized): every write of a state is conditional on it.
    """

    leader: int
    leader_epoch: int
    isr: list[int]
    controller_epoch: int
    zk_version: int = -1

    def to_json(self) -> bytes:
        return json.dumps(
            {"leader": self.leader, "leader_epoch": self.leader_epoch, "isr": self.isr,
             "controller_epoch": self.controller_epoch}
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, zk_version: int = -1) -> PartitionStateData:
        d = json.loads(raw)
        return cls(int(d["leader"]), int(d["leader_epoch"]), [int(b) for b in d["isr"]],
                   int(d["controller_epoch"]), zk_version)


@dataclass(frozen=True)
class BrokerRegistration:
    """A live broker: /brokers/ids/<id> holds host, port and rack; epoch is the znode's czxid."""

    broker_id: int
    host: str
    port: int
    rack: str = ""
    epoch: int = -1
    data_port: int = 0  # record transport on `host` (logbroker/wire.py); 0: none
    # (topic, partition, topic id) of logs this broker created whose directory vanished: it must not
    # lead them (the controller marks them offline before electing anyone, as KRaft's offline log dirs)
    lost_replicas: tuple[tuple[str, int, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"host": self.host, "port": self.port, "rack": self.rack}
        if self.data_port:
            d["data_port"] = self.data_port
        if self.lost_replicas:
            d["lost_replicas"] = [list(r) for r in self.lost_replicas[:LOST_REPLICAS_REGISTERED_MAX]]
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, broker_id: int, raw: bytes, epoch: int = -1) -> BrokerRegistration:
        d = json.loads(raw)
        lost = tuple((str(t), int(p), str(i)) for t, p, i in d.get("lost_replicas", ())[:LOST_REPLICAS_REGISTERED_MAX])
        return cls(broker_id, str(d["host"]), int(d["port"]), str(d.get("rack", "")), epoch,
                   int(d.get("data_port", 0)), lost)
