"""The mirror process: copies the selected topics of cluster A (source) to cluster B (target).

    source A ── Consumer (group --group, no auto-commit) ──> Mirror ── idempotent Producer (acks=all) ──> B

Per record: same partition, key, value, headers (plus `logbroker.mirror.src`, progress.py) and
timestamp. Each polled run of one source partition goes to B in one `Producer.send_records` call
(no checks or partitioning per record, one future per run). Every `flush_interval_ms` (or
`flush_records` records) the producer is flushed; once B acknowledged, the copies go into the
OffsetMap (as runs: offset_map.copied_runs) and their source offsets are committed on A.

Restart without loss or duplicates: the progress that counts is B's (progress.py). When a source
partition is assigned, the mirror reads the last record of its target partition (after waiting
until that partition's high watermark equals its log end, so a killed producer's last batches are
settled) and seeks A to the source offset after it; A's committed offset is used only when the
target partition holds no mirrored record. The offset map is seeded from B's copy too, so group
offsets translate across restarts. A copy that fails for good (delivery timeout, a
refusal) stops the mirror with the error: restarting resumes from B, so nothing is skipped.

Topics: every `topics_interval_ms` A's topic list is read again; new matches (naming.py) get their
target topic (same partition count and config, replication factor min(source's, B's brokers)),
grown when A's partition count grows, and join the subscription.

Group offsets (`sync_groups`): every `checkpoint_interval_ms`, for each group on A matching the
pattern (never the mirror's own), its committed offsets of mirrored topics are translated
(offset_map.py) and committed for the same group on B, on the target topic names — only while that
group has no members on B (as MirrorMaker 2: once consumers run on B, B's offsets are theirs).

Lag, logged every `report_interval_ms`: per partition, A's high watermark (from the last fetch)
minus the mirrored position.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

from logbroker.client import Admin, Consumer, Producer
from logbroker.client.producer.future import FutureRecordsMetadata
from logbroker.client.sasl import SaslConfig
from logbroker.errors import (
    GroupIdNotFoundError,
    LogbrokerError,
    NonEmptyGroupError,
    TopicAlreadyExistsError,
)
from logbroker.mirror import naming, progress
from logbroker.mirror.offset_map import OffsetMap, Run, copied_runs
from logbroker.storage.record_batch import Message
from logbroker.tls import TlsConfig

log = logging.getLogger(__name__)
TopicPartition = tuple[str, int]

# Target topics copy their source's config but this: every record goes to its source partition, whose
# keys the source placed by its count at the time (cluster/lineage.py), so the target never checks keys
# on growth (a copy of a record placed before the source grew would be refused) and does not gate its
# children: per-key order across a growth holds on the source; on the target, within each partition.
TARGET_CONFIG = {"key_order_on_growth": "false"}
SETTLE_TIMEOUT_S = 30.0  # waiting for a target partition's high watermark to reach its log end
READ_LAST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MirrorSettings:
    source: str
    target: str
    topics: str  # regex, whole name
    group: str
    prefix: str | None = None  # the source's alias, put before target topic names
    target_alias: str | None = None  # topics named "<target_alias>.x" on A are never mirrored
    sync_groups: str | None = None  # regex of A's groups whose offsets are translated to B
    flush_interval_ms: int = 1_000
    flush_records: int = 20_000
    checkpoint_interval_ms: int = 5_000
    topics_interval_ms: int = 10_000
    report_interval_ms: int = 5_000
    max_poll_records: int = 5_000
    session_timeout_ms: int = 10_000  # a killed mirror's partitions move to its successor after this
    source_tls: TlsConfig | None = None
    source_sasl: SaslConfig | None = None
    target_tls: TlsConfig | None = None
    target_sasl: SaslConfig | None = None


class _Chunk(NamedTuple):
    """One `send_records` call: a run of source partition `tp`'s records, offsets first..last."""

    tp: TopicPartition
    first: int
    last: int
    gaps: list[int] | None  # every source offset, when the run is not contiguous (else None)
    future: FutureRecordsMetadata


class MirrorConnectError(LogbrokerError):
    """A cluster refused the mirror at start (bad credentials, TLS, unreachable): one line, which cluster."""


def _connect(role: str, address: str, tls: TlsConfig | None, sasl: SaslConfig | None) -> Admin:
    """An Admin of one cluster, tried once: a refusal (wrong password, TLS, down) fails the mirror at
    once with one line naming the cluster."""
    admin = None
    try:
        admin = Admin(address, tls=tls, sasl=sasl)
        admin.describe_cluster()
        return admin
    except (LogbrokerError, OSError) as e:
        if admin is not None:
            admin.close()
        raise MirrorConnectError(f"the {role} cluster {address}: {e}") from None


class Mirror:
    def __init__(self, settings: MirrorSettings) -> None:
        self.s = settings
        self._pattern = re.compile(settings.topics)
        self._groups = re.compile(settings.sync_groups) if settings.sync_groups else None
        self._admin_a = _connect("source", settings.source, settings.source_tls, settings.source_sasl)
        try:
            self._admin_b = _connect("target", settings.target, settings.target_tls, settings.target_sasl)
        except MirrorConnectError:
            self._admin_a.close()
            raise
        self._producer = Producer(settings.target, acks="all", linger_ms=5, tls=settings.target_tls,
                                  sasl=settings.target_sasl)
        self._consumer = Consumer(settings.source, group=settings.group, enable_auto_commit=False,
                                  tls=settings.source_tls, sasl=settings.source_sasl,
                                  on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
                                  max_poll_records=settings.max_poll_records,
                                  session_timeout_ms=settings.session_timeout_ms)
        self._reader: Consumer | None = None  # reads the last records of target partitions
        self._topics: list[str] = []
        self._pending: list[_Chunk] = []  # sent, not yet flushed
        self._pending_records = 0
        self._positions: dict[TopicPartition, int] = {}  # next source offset to copy, once known
        self.offsets = OffsetMap()
        self._written: dict[tuple[str, str, int], int] = {}  # (group, target topic, partition) -> offset
        self.copied = 0
        self.status: dict[str, Any] = {}  # the last report (status.py serves it)
        self._stop = threading.Event()

    # -- topics ------------------------------------------------------------------------------

    def refresh_topics(self) -> None:
        wanted = naming.mirrored_topics(self._admin_a.list_topics(), self._pattern, self.s.prefix,
                                        self.s.target_alias)
        if wanted:
            self._ensure_targets(wanted)
        if wanted != self._topics:
            log.info("mirroring %d topic(s): %s", len(wanted), ", ".join(wanted) or "-")
            self._topics = wanted
            if wanted:
                self._consumer.subscribe(wanted)

    def _ensure_targets(self, topics: list[str]) -> None:
        existing = {t.name: t for t in self._admin_b.describe_topics()}
        brokers = max(1, len(self._admin_b.describe_cluster()["brokers"]))
        for src in self._admin_a.describe_topics(topics):
            name = naming.target_topic(src.name, self.s.prefix)
            count = len(src.partitions)
            have = existing.get(name)
            if have is None:
                rf = min(brokers, max((len(p.replicas) for p in src.partitions), default=1))
                try:
                    # placed as on the source: a target that grew (below) must not refuse a record
                    # placed by the source's older count, which a lagging copy still brings
                    self._admin_b.create_topic(name, count, rf, {**src.config, **TARGET_CONFIG})
                    log.info("created %s on the target: %d partitions, replication %d", name, count, rf)
                except TopicAlreadyExistsError:
                    pass
            elif len(have.partitions) < count:
                self._admin_b.create_partitions(name, count)
                log.info("grew %s on the target to %d partitions", name, count)

    # -- assignment: where to resume ----------------------------------------------------------

    def _on_assign(self, partitions: Any) -> None:
        for topic, partition in sorted(partitions):
            start = self._resume_offset(topic, partition)
            if start is not None:
                self._consumer.seek(topic, partition, start)
                log.info("%s-%d: resuming at source offset %d (from the target)", topic, partition, start)

    def _on_revoke(self, partitions: Any) -> None:
        self.flush()
        for tp in partitions:
            self._positions.pop(tp, None)

    def _on_lost(self, partitions: Any) -> None:
        for tp in partitions:
            self._positions.pop(tp, None)

    def _resume_offset(self, topic: str, partition: int) -> int | None:
        """The source offset after the last record mirrored into the target partition (None: none)."""
        name = naming.target_topic(topic, self.s.prefix)
        end = self._settled_end(name, partition)
        if end <= 0:
            return None
        last = self._read_record(name, partition, end - 1)
        if last is None:
            return None
        src = progress.source_position(last.headers, partition)
        if src is None:
            log.warning("%s-%d: the target's last record carries no %s header: resuming from the "
                        "group's committed offset", name, partition, progress.SRC_HEADER)
            return None
        self._seed_offsets((topic, partition), name, src, last.offset)
        self._positions[(topic, partition)] = src + 1
        return src + 1

    def _seed_offsets(self, tp: TopicPartition, name: str, last_src: int, last_tgt: int) -> None:
        """The offset map from what B holds: one run from B's first record when B's copy is
        contiguous (source and target offsets equally far apart), else only the last record."""
        start = self._admin_b.describe_topic(name).partitions[tp[1]].log_start_offset
        first = self._read_record(name, tp[1], start) if start < last_tgt else None
        first_src = None if first is None else progress.source_position(first.headers, tp[1])
        if first is not None and first_src is not None and last_src - first_src == last_tgt - first.offset:
            self.offsets.seed(tp, Run(first_src, first.offset, last_tgt - first.offset + 1))
        else:
            self.offsets.seed(tp, Run(last_src, last_tgt, 1))

    def _settled_end(self, name: str, partition: int) -> int:
        """The target partition's high watermark once it equals its log end (bounded wait)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            parts = self._admin_b.describe_topic(name).partitions
            if partition >= len(parts):  # grown on A, not yet on B: nothing mirrored there
                return 0
            info = parts[partition]
            if info.high_watermark >= info.log_end_offset or time.monotonic() >= deadline:
                return info.high_watermark
            time.sleep(0.1)

    def _read_record(self, name: str, partition: int, offset: int) -> Message | None:
        if self._reader is None:
            self._reader = Consumer(self.s.target, enable_auto_commit=False, max_poll_records=1,
                                    tls=self.s.target_tls, sasl=self.s.target_sasl)
        reader = self._reader
        reader.assign([(name, partition)])
        reader.seek(name, partition, offset)
        deadline = time.monotonic() + READ_LAST_TIMEOUT_S
        while time.monotonic() < deadline:
            for m in reader.poll(timeout_ms=500):
                if m.offset >= offset:
                    return m
        raise LogbrokerError(f"could not read {name}-{partition} offset {offset} on the target "
                             f"within {READ_LAST_TIMEOUT_S:.0f} s")

    # -- copying -------------------------------------------------------------------------------

    def copy(self, messages: list[Message]) -> None:
        """Send the polled records to B: one `send_records` call per run of one source partition."""
        n = len(messages)
        start = 0
        while start < n:
            first = messages[start]
            topic, partition = first.topic, first.partition
            end = start + 1
            while end < n and messages[end].partition == partition and messages[end].topic == topic:
                end += 1
            self._copy_run(topic, partition, messages[start:end] if start or end < n else messages)
            start = end

    def _copy_run(self, topic: str, partition: int, run: list[Message]) -> None:
        with_source = progress.with_source
        records = [(m.timestamp, m.key, m.value, with_source(m.headers, partition, m.offset)) for m in run]
        fut = self._producer.send_records(naming.target_topic(topic, self.s.prefix), partition, records)
        first, last = run[0].offset, run[-1].offset
        gaps = None if last - first == len(run) - 1 else [m.offset for m in run]  # a compacted source
        self._pending.append(_Chunk((topic, partition), first, last, gaps, fut))
        self._pending_records += len(run)

    def flush(self) -> None:
        """Wait for B's acknowledgements of everything sent, then commit A's offsets (a hint)."""
        if not self._pending:
            return
        self._producer.flush()
        done: dict[TopicPartition, int] = {}
        for chunk in self._pending:
            # a copy that failed for good raises: the mirror stops, B holds a prefix
            self._record_offsets(chunk, chunk.future.runs())
            done[chunk.tp] = chunk.last + 1
        self.copied += self._pending_records
        self._pending, self._pending_records = [], 0
        self._positions.update(done)
        assigned = self._consumer.assignment()
        commit = {tp: off for tp, off in done.items() if tp in assigned}
        if commit:
            try:
                self._consumer.commit(commit)
            except LogbrokerError as e:  # only a hint: B holds the progress
                log.warning("commit on the source failed (B keeps the progress): %s", e)

    def _record_offsets(self, chunk: _Chunk, target_runs: list[tuple[int, int, int]]) -> None:
        """The offset map from where B put a chunk (offset_map.copied_runs)."""
        for run in copied_runs(chunk.first, chunk.gaps, target_runs):
            self.offsets.record_run(chunk.tp, run.src_start, run.tgt_start, run.length)

    # -- group offsets -------------------------------------------------------------------------

    def sync_group_offsets(self) -> int:
        """Translate and commit on B the offsets of A's matching groups; returns how many changed."""
        if self._groups is None:
            return 0
        changed = 0
        for listing in self._admin_a.list_groups():
            group = listing.group
            if group == self.s.group or not self._groups.fullmatch(group):
                continue
            try:
                offsets = self._admin_a.describe_group(group).offsets
            except GroupIdNotFoundError:
                continue
            changed += self._sync_group(group, offsets)
        return changed

    def _sync_group(self, group: str, offsets: dict[TopicPartition, int]) -> int:
        by_topic: dict[str, dict[int, int]] = defaultdict(dict)
        for (topic, partition), committed in offsets.items():
            if topic not in self._topics or committed < 0:
                continue
            translated = self.offsets.translate((topic, partition), committed)
            name = naming.target_topic(topic, self.s.prefix)
            if translated is not None and self._written.get((group, name, partition)) != translated:
                by_topic[name][partition] = translated
        changed = 0
        for name, parts in by_topic.items():
            for partition, offset in sorted(parts.items()):
                try:
                    self._admin_b.reset_offsets(group, name, "offset", offset, partitions=[partition])
                except NonEmptyGroupError:
                    log.debug("group %s has members on the target: its offsets there are its own", group)
                    return changed
                self._written[(group, name, partition)] = offset
                changed += 1
        return changed

    # -- lag -----------------------------------------------------------------------------------

    def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: A's high watermark (last fetch) minus the mirrored position."""
        out = {}
        for topic, partition in sorted(self._consumer.assignment()):
            hw = self._consumer.highwater(topic, partition)
            pos = self._positions.get((topic, partition))
            if hw >= 0 and pos is not None:
                out[(topic, partition)] = max(0, hw - pos)
            elif hw >= 0:
                out[(topic, partition)] = hw
        return out

    def report(self, rate: float) -> None:
        if not self._consumer.assignment():  # "lag 0" would be a lie: nothing is being copied
            log.info("mirror: copied %d records (%.0f records/s), no partitions assigned", self.copied, rate)
            self.status = {"copied": self.copied, "records_per_s": rate, "assigned": False, "lag_total": None,
                           "lag": {}}
            return
        lags = self.lag()
        self.status = {"copied": self.copied, "records_per_s": rate, "assigned": True,
                       "lag_total": sum(lags.values()), "lag": {f"{t}-{p}": n for (t, p), n in lags.items()}}
        parts = " ".join(f"{t}-{p}={n}" for (t, p), n in lags.items() if n)
        log.info("mirror: copied %d records (%.0f records/s), lag %d records%s", self.copied, rate,
                 sum(lags.values()), f" ({parts})" if parts else "")

    # -- the loop ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Copy until stop(); flushes and commits on the way out."""
        s = self.s
        now = time.monotonic()
        next_flush = now + s.flush_interval_ms / 1000
        next_topics = now
        next_checkpoint = now + s.checkpoint_interval_ms / 1000
        next_report, last_copied = now + s.report_interval_ms / 1000, 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_topics:
                    self.refresh_topics()
                    next_topics = now + s.topics_interval_ms / 1000
                if self._topics:
                    self.copy(self._consumer.poll(timeout_ms=200))
                else:
                    self._stop.wait(0.2)
                now = time.monotonic()
                if self._pending_records >= s.flush_records or now >= next_flush:
                    self.flush()
                    next_flush = now + s.flush_interval_ms / 1000
                if now >= next_checkpoint:
                    self.sync_group_offsets()
                    next_checkpoint = now + s.checkpoint_interval_ms / 1000
                if now >= next_report:
                    self.report((self.copied - last_copied) / (s.report_interval_ms / 1000))
                    next_report, last_copied = now + s.report_interval_ms / 1000, self.copied
            self.flush()
        finally:
            self.close()

    def close(self) -> None:
        for closer in (self._consumer, self._reader, self._producer, self._admin_a, self._admin_b):
            if closer is not None:
                try:
                    closer.close()
                except LogbrokerError as e:
                    log.warning("closing: %s", e)
