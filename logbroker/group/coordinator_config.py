"""The group coordinator's settings (`serve` flags and config file; logbroker/config.py reads them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoordinatorConfig:
    offsets_topic_partitions: int = 16
    offsets_topic_replication_factor: int = 3  # capped at the live brokers when the topic is created
    offsets_topic_segment_bytes: int = 4 << 20
    session_timeout_ms: int = 45_000
    session_timeout_ms_min: int = 1_000
    session_timeout_ms_max: int = 1_800_000
    rebalance_timeout_ms: int = 300_000
    heartbeat_interval_ms: int = 500
    reconciling_heartbeat_interval_ms: int = 100
    default_assignor: str = "sticky"
    group_members_max: int = 1000
    commit_timeout_ms: int = 10_000
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000
    offsets_retention_check_interval_ms: int = 60_000
