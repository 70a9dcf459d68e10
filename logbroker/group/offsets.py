"""What a coordinator writes to `__consumer_offsets` (committed offsets and group membership), and
the state it rebuilds from it (pure: bytes in, state out; no I/O).

Every commit is one record in partition `hash(group)` of `__consumer_offsets`; the coordinator
keeps the latest value per (group, topic, partition) in memory and, when it becomes leader of the
partition, replays the partition's log from its start to rebuild that memory (`OffsetsState`).
Membership changes are records too: the group's latest `membership.Group.snapshot()`.

Byte layout (big-endian, as the rest of Kafka's formats; `str16` = int16 length + UTF-8 bytes)::

    offset commit
    key    int16 key_version = 0      (a reader skips records with a key version it does not know)
           str16 group
           str16 topic
           int32 partition
    value  int16 value_version = 0
           int64 offset               next offset the group reads; >= 0
           int64 commit_timestamp_ms  wall clock of the coordinator when it accepted the commit
           str16 metadata             the client's string, <= METADATA_MAX_CHARS

    group membership
    key    int16 key_version = 1
           str16 group
    value  int16 value_version = 0
           bytes the snapshot as UTF-8 JSON, to the end of the value (<= MEMBERSHIP_MAX_BYTES)

    share group (queues: its settings; group/share_settings.py)
    key    int16 key_version = 2
           str16 group
    value  int16 value_version = 0
           bytes the settings as UTF-8 JSON, to the end of the value

    share partition (queues: the state of one partition of a share group; group/share_partition.py)
    key    int16 key_version = 3
           str16 group
           str16 topic
           int32 partition
    value  int16 value_version = 0
           bytes SharePartition.snapshot(), to the end of the value

    share partition deferred records (queues: one chunk of a partition's delayed records;
    group/share_deferred.py)
    key    int16 key_version = 4
           str16 group
           str16 topic
           int32 partition
           int64 chunk
    value  int16 value_version = 0
           bytes the chunk (share_deferred.py's layout), to the end of the value

    tombstone: the same key with a null value (a deleted group, expired offsets, a group that has no
    members any more)

Bounds: group ids and topic names are validated by the callers (<= 249 characters); metadata is
limited to METADATA_MAX_CHARS, so a record is always far below the topic's max_message_bytes.
Garbage in the log (a key or value that does not parse) is skipped and counted, never fatal: a
coordinator must come up even if someone produced junk to the internal topic.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from logbroker.storage.record_batch import BatchBuilder, decode_batch, iter_batches

OFFSETS_TOPIC = "__consumer_offsets"
KEY_VERSION = 0
MEMBERSHIP_KEY_VERSION = 1
SHARE_GROUP_KEY_VERSION = 2
SHARE_PARTITION_KEY_VERSION = 3
SHARE_DEFERRED_KEY_VERSION = 4
_I64 = struct.Struct(">q")
VALUE_VERSION = 0
METADATA_MAX_CHARS = 4096
MEMBERSHIP_MAX_BYTES = 768 << 10  # below the topic's 1 MiB max_message_bytes with room for the batch

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_VALUE_HEAD = struct.Struct(">hqq")
_VERSION_0 = _I16.pack(VALUE_VERSION)
_MEMBERSHIP_KEY_HEAD = _I16.pack(MEMBERSHIP_KEY_VERSION)
_EMPTY_STR16 = _I16.pack(0)
NAMES_CACHED_MAX = 1 << 16  # (group, topic) pairs whose decoded names a replay keeps

TopicPartition = tuple[str, int]


class CommittedOffset(NamedTuple):
    offset: int
    metadata: str
    commit_timestamp_ms: int
    log_offset: int  # where in __consumer_offsets the record that set it is (-1: not yet written)


def _str16(s: str) -> bytes:
    b = s.encode()
    return _I16.pack(len(b)) + b


def _read_str16(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = _I16.unpack_from(buf, pos)
    pos += 2
    if n < 0 or pos + n > len(buf):
        raise ValueError("string runs past the end")
    return buf[pos:pos + n].decode(), pos + n


def encode_key(group: str, topic: str, partition: int) -> bytes:
    return _I16.pack(KEY_VERSION) + _str16(group) + _str16(topic) + _I32.pack(partition)


def decode_key(buf: bytes) -> tuple[str, str, int] | None:
    """(group, topic, partition), or None for a key of another version. Raises ValueError on junk."""
    if len(buf) < 2:
        raise ValueError("key too short")
    (version,) = _I16.unpack_from(buf, 0)
    if version != KEY_VERSION:
        return None
    group, pos = _read_str16(buf, 2)
    topic, pos = _read_str16(buf, pos)
    if pos + 4 != len(buf):
        raise ValueError("key length does not match its fields")
    (partition,) = _I32.unpack_from(buf, pos)
    return group, topic, partition


def encode_membership_key(group: str) -> bytes:
    return _I16.pack(MEMBERSHIP_KEY_VERSION) + _str16(group)


def encode_membership_value(snapshot: dict[str, object]) -> bytes:
    """Raises ValueError when the snapshot is above MEMBERSHIP_MAX_BYTES (the caller then keeps the
    group in memory only)."""
    body = json.dumps(snapshot, separators=(",", ":")).encode()
    if len(body) > MEMBERSHIP_MAX_BYTES:
        raise ValueError(f"group snapshot of {len(body)} bytes is above {MEMBERSHIP_MAX_BYTES}")
    return _I16.pack(VALUE_VERSION) + body


def membership_batch(group: str, snapshot: dict[str, object] | None, now_ms: int) -> bytes:
    """One record: the group's membership snapshot, or its tombstone (None)."""
    builder = BatchBuilder(now_ms)
    builder.append(now_ms, encode_membership_key(group), None if snapshot is None else encode_membership_value(snapshot))
    return builder.build()


def share_group_record(group: str, settings: dict[str, object] | None) -> tuple[bytes, bytes | None]:
    """(key, value) of a share group's settings record (value None: the group is deleted)."""
    key = _I16.pack(SHARE_GROUP_KEY_VERSION) + _str16(group)
    if settings is None:
        return key, None
    return key, _I16.pack(VALUE_VERSION) + json.dumps(settings, separators=(",", ":")).encode()


def share_partition_record(group: str, topic: str, partition: int, snapshot: bytes | None) -> tuple[bytes, bytes | None]:
    """(key, value) of one share partition's state record (value None: deleted)."""
    key = _I16.pack(SHARE_PARTITION_KEY_VERSION) + _str16(group) + _str16(topic) + _I32.pack(partition)
    return key, None if snapshot is None else _I16.pack(VALUE_VERSION) + snapshot


def share_deferred_record(group: str, topic: str, partition: int, chunk: int,
                          body: bytes | None) -> tuple[bytes, bytes | None]:
    """(key, value) of one chunk of a share partition's deferred records (value None: empty now)."""
    key = (_I16.pack(SHARE_DEFERRED_KEY_VERSION) + _str16(group) + _str16(topic) + _I32.pack(partition)
           + _I64.pack(chunk))
    return key, None if body is None else _I16.pack(VALUE_VERSION) + body


def records_batch(records: Iterable[tuple[bytes, bytes | None]], now_ms: int) -> bytes:
    builder = BatchBuilder(now_ms)
    for key, value in records:
        builder.append(now_ms, key, value)
    return builder.build()


def _usual_value(value: bytes) -> bool:
    """A commit value of version 0 with no metadata and a non-negative offset (most of them): its
    fields are read with one struct unpack."""
    return (len(value) == _VALUE_HEAD.size + 2 and value[2] < 0x80 and value[:2] == _VERSION_0
            and value[-2:] == _EMPTY_STR16)


def encode_value(offset: int, metadata: str, commit_timestamp_ms: int) -> bytes:
    return _VALUE_HEAD.pack(VALUE_VERSION, offset, commit_timestamp_ms) + _str16(metadata)


def decode_value(buf: bytes) -> tuple[int, str, int]:
    """(offset, metadata, commit_timestamp_ms). Raises ValueError on junk or an unknown version."""
    if len(buf) < _VALUE_HEAD.size + 2:
        raise ValueError("value too short")
    version, offset, ts = _VALUE_HEAD.unpack_from(buf, 0)
    if version != VALUE_VERSION:
        raise ValueError(f"value version {version}")
    metadata, pos = _read_str16(buf, _VALUE_HEAD.size)
    if pos != len(buf) or offset < 0:
        raise ValueError("bad value")
    return offset, metadata, ts


def commit_batch(group: str, offsets: dict[TopicPartition, tuple[int, str]], now_ms: int) -> bytes:
    """One RecordBatch with a record per committed partition (the leader assigns its offsets)."""
    builder = BatchBuilder(now_ms)
    for (topic, partition), (offset, metadata) in offsets.items():
        builder.append(now_ms, encode_key(group, topic, partition), encode_value(offset, metadata, now_ms))
    return builder.build()


def tombstone_batch(group: str, partitions: Iterable[TopicPartition], now_ms: int) -> bytes:
    builder = BatchBuilder(now_ms)
    for topic, partition in partitions:
        builder.append(now_ms, encode_key(group, topic, partition), None)
    return builder.build()


@dataclass
class OffsetsState:
    """The latest committed offset of every (group, topic, partition) in one partition of
    `__consumer_offsets`, as replayed from its log.

    Offset commits, the bulk of a replay, are kept as raw (log offset, value) per raw key while
    records are applied (one dict store each), and decoded only when `groups` is next read: only
    the latest record of a key is decoded, however many commits the log holds for it."""

    _groups: dict[str, dict[TopicPartition, CommittedOffset]] = field(default_factory=dict)
    memberships: dict[str, dict[str, object]] = field(default_factory=dict)  # group -> latest snapshot
    share_groups: dict[str, dict[str, object]] = field(default_factory=dict)  # share group -> settings
    share_partitions: dict[tuple[str, str, int], bytes] = field(default_factory=dict)  # -> snapshot
    share_deferred: dict[tuple[str, str, int], dict[int, bytes]] = field(default_factory=dict)  # -> chunks
    _skipped: int = 0
    next_offset: int = 0  # the log offset replay continues from
    records_read: int = 0  # records replayed (fewer than the offsets spanned once compacted)
    _names: dict[bytes, tuple[str, str]] = field(default_factory=dict, repr=False)  # _decode_key's
    # commits not decoded yet: raw key -> (log offset, the usual value's raw bytes, (offset, metadata,
    # timestamp) of any other value, or None for a tombstone)
    _raw: dict[bytes, tuple[int, bytes | tuple[int, str, int] | None]] = field(default_factory=dict, repr=False)

    @property
    def groups(self) -> dict[str, dict[TopicPartition, CommittedOffset]]:
        if self._raw:
            self._decode_commits()
        return self._groups

    @property
    def skipped_records(self) -> int:
        """Records that did not parse (skipped, never fatal)."""
        if self._raw:
            self._decode_commits()
        return self._skipped

    def _decode_commits(self) -> None:
        raw, self._raw = self._raw, {}
        unpack = _VALUE_HEAD.unpack_from
        for key, (log_offset, value) in raw.items():
            if isinstance(value, bytes):
                _v, offset, ts = unpack(value, 0)
                self._apply_commit(log_offset, key, (offset, "", ts))
            else:
                self._apply_commit(log_offset, key, value)

    def apply(self, log_offset: int, key: bytes | None, value: bytes | None) -> None:
        """Replay one record (records must come in log order)."""
        self.records_read += 1
        if log_offset >= self.next_offset:
            self.next_offset = log_offset + 1
        try:
            if key is None:
                raise ValueError("record without key")
            head = key[:2]
            if head == _VERSION_0:  # an offset commit: its key is decoded once the replay is done (class doc)
                if value is None:
                    self._raw[key] = (log_offset, None)
                elif _usual_value(value):
                    self._raw[key] = (log_offset, value)
                else:
                    self._raw[key] = (log_offset, decode_value(value))
                return
            if head == _MEMBERSHIP_KEY_HEAD:
                self._apply_membership(key, value)
                return
            version = _I16.unpack_from(key, 0)[0] if len(key) >= 2 else -1
            if version in (SHARE_GROUP_KEY_VERSION, SHARE_PARTITION_KEY_VERSION, SHARE_DEFERRED_KEY_VERSION):
                self._apply_share(version, key, value)
            return
        except (ValueError, UnicodeDecodeError, struct.error):  # json.JSONDecodeError is a ValueError
            self._skipped += 1

    def _apply_commit(self, log_offset: int, key: bytes, value: tuple[int, str, int] | None) -> None:
        try:
            parsed = self._decode_key(key)
        except (ValueError, UnicodeDecodeError, struct.error):
            self._skipped += 1
            return
        if parsed is None:
            return
        group, topic, partition = parsed
        if value is None:
            offsets = self._groups.get(group)
            if offsets is not None:
                offsets.pop((topic, partition), None)
                if not offsets:
                    del self._groups[group]
            return
        offset, metadata, ts = value
        self._groups.setdefault(group, {})[(topic, partition)] = CommittedOffset(offset, metadata, ts, log_offset)

    def _decode_key(self, key: bytes) -> tuple[str, str, int] | None:
        """decode_key, with the (group, topic) of a key's first bytes (all but the partition) decoded
        once per replay: a commit writes one record per partition of the same group and topic."""
        head = key[:-4]
        names = self._names.get(head)
        if names is None:
            parsed = decode_key(key)
            if parsed is not None and len(self._names) < NAMES_CACHED_MAX:
                self._names[head] = parsed[:2]
            return parsed
        return names[0], names[1], _I32.unpack_from(key, len(head))[0]

    def _apply_membership(self, key: bytes, value: bytes | None) -> None:
        group, pos = _read_str16(key, 2)
        if pos != len(key):
            raise ValueError("membership key length does not match its fields")
        if value is None:
            self.memberships.pop(group, None)
            return
        if len(value) < 2 or _I16.unpack_from(value, 0)[0] != VALUE_VERSION:
            raise ValueError("membership value version")
        snapshot = json.loads(value[2:])
        if not isinstance(snapshot, dict):
            raise ValueError("membership snapshot is not an object")
        self.memberships[group] = snapshot

    def _apply_share(self, version: int, key: bytes, value: bytes | None) -> None:
        group, pos = _read_str16(key, 2)
        if value is not None and (len(value) < 2 or _I16.unpack_from(value, 0)[0] != VALUE_VERSION):
            raise ValueError("share record value version")
        if version == SHARE_GROUP_KEY_VERSION:
            if pos != len(key):
                raise ValueError("share group key length does not match its fields")
            if value is None:
                self.share_groups.pop(group, None)
                for k in [k for k in self.share_partitions if k[0] == group]:
                    del self.share_partitions[k]
                for k in [k for k in self.share_deferred if k[0] == group]:
                    del self.share_deferred[k]
                return
            settings = json.loads(value[2:])
            if not isinstance(settings, dict):
                raise ValueError("share group settings are not an object")
            self.share_groups[group] = settings
            return
        topic, pos = _read_str16(key, pos)
        if version == SHARE_DEFERRED_KEY_VERSION:
            if pos + 12 != len(key):
                raise ValueError("share deferred key length does not match its fields")
            k = (group, topic, _I32.unpack_from(key, pos)[0])
            chunk = _I64.unpack_from(key, pos + 4)[0]
            chunks = self.share_deferred.setdefault(k, {})
            if value is None:
                chunks.pop(chunk, None)
            else:
                chunks[chunk] = bytes(value[2:])
            return
        if pos + 4 != len(key):
            raise ValueError("share partition key length does not match its fields")
        k = (group, topic, _I32.unpack_from(key, pos)[0])
        if value is None:
            self.share_partitions.pop(k, None)
        else:
            self.share_partitions[k] = bytes(value[2:])

    def apply_chunk(self, data: bytes, topic: str, partition: int) -> int:
        """Replay every complete batch of `data` (raw log bytes) from `next_offset` on; returns the
        number of bytes consumed (a trailing partial batch is left for the next chunk). A batch
        with a bad CRC raises CorruptMessageError (the log's recovery never lets one through)."""
        used = 0
        for header, pos in iter_batches(data):
            used = pos + header.size_bytes
            if header.is_control:
                self.next_offset = max(self.next_offset, header.next_offset)
                continue
            raw = self._raw
            for m in decode_batch(data, pos, header, topic, partition, self.next_offset):
                key, value = m.key, m.value
                if key is not None and value is not None and key[:2] == _VERSION_0 and _usual_value(value):
                    raw[key] = (m.offset, value)  # apply()'s first case, inline: most records are commits
                    self.records_read += 1
                else:
                    self.apply(m.offset, key, value)
            self.next_offset = max(self.next_offset, header.next_offset)
        return used

