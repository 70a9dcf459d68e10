"""The __consumer_offsets record layout and its replay (pure: no broker)."""

from __future__ import annotations

import pytest

from logbroker.errors import CorruptMessageError
from logbroker.group.offsets import (
    OffsetsState,
    commit_batch,
    decode_key,
    decode_value,
    encode_key,
    encode_value,
    tombstone_batch,
)
from logbroker.storage import record_batch as rb


def _log(*batches: bytes) -> bytes:
    """Batches back to back with consecutive offsets, as the leader would have assigned them."""
    out = bytearray()
    offset = 0
    for b in batches:
        buf = bytearray(b)
        rb.set_base_offset(buf, 0, offset)
        offset += rb.parse_header(buf).record_count
        out += buf  # the base offset lies outside the CRC
    return bytes(out)


def test_key_and_value_round_trip() -> None:
    key = encode_key("billing", "orders.v1", 7)
    assert decode_key(key) == ("billing", "orders.v1", 7)
    assert decode_value(encode_value(42, "meta ✓", 1_700_000_000_000)) == (42, "meta ✓", 1_700_000_000_000)


@pytest.mark.parametrize("junk", [b"", b"\x00", b"\x00\x00\x00\x05ab", b"\x00\x00\x00\x01g\x00\x01t\x00\x00"])
def test_junk_keys_raise(junk: bytes) -> None:
    with pytest.raises(ValueError):
        decode_key(junk)


def test_unknown_key_version_is_ignored() -> None:
    assert decode_key(b"\x00\x07whatever") is None


def test_negative_offset_value_is_junk() -> None:
    with pytest.raises(ValueError):
        decode_value(encode_value(-1, "", 0))


def test_replay_keeps_the_latest_and_applies_tombstones() -> None:
    data = _log(
        commit_batch("g", {("t", 0): (5, ""), ("t", 1): (9, "x")}, 1000),
        commit_batch("g", {("t", 0): (7, "y")}, 2000),
        commit_batch("h", {("t", 0): (1, "")}, 3000),
        tombstone_batch("h", [("t", 0)], 4000),
    )
    state = OffsetsState()
    assert state.apply_chunk(data, "__consumer_offsets", 0) == len(data)
    assert {tp: c.offset for tp, c in state.groups["g"].items()} == {("t", 0): 7, ("t", 1): 9}
    assert state.groups["g"][("t", 0)].metadata == "y"
    assert state.groups["g"][("t", 0)].log_offset == 2
    assert "h" not in state.groups
    assert state.next_offset == 5


def test_replay_in_chunks_skips_what_it_has_seen_and_stops_at_partial_batches() -> None:
    data = _log(commit_batch("g", {("t", 0): (1, "")}, 1), commit_batch("g", {("t", 0): (2, "")}, 2))
    first = len(commit_batch("g", {("t", 0): (1, "")}, 1))
    state = OffsetsState()
    assert state.apply_chunk(data[: first + 10], "__consumer_offsets", 0) == first  # second batch incomplete
    assert state.groups["g"][("t", 0)].offset == 1
    # a read that starts at the batch containing next_offset hands back an already-applied batch too
    assert state.apply_chunk(data, "__consumer_offsets", 0) == len(data)
    assert state.groups["g"][("t", 0)].offset == 2 and state.next_offset == 2


def test_garbage_records_are_counted_not_fatal() -> None:
    b = rb.BatchBuilder(0)
    b.append(0, None, b"no key")
    b.append(0, b"\x00\x00\x00\x01g", b"bad key")
    b.append(0, encode_key("g", "t", 0), b"\x00\x09bad value version....")
    b.append(0, encode_key("g", "t", 1), encode_value(3, "", 0))
    state = OffsetsState()
    state.apply_chunk(_log(b.build()), "__consumer_offsets", 0)
    assert state.skipped_records == 3
    assert state.groups == {"g": {("t", 1): state.groups["g"][("t", 1)]}}


def test_a_corrupt_batch_is_never_applied() -> None:
    data = bytearray(_log(commit_batch("g", {("t", 0): (1, "")}, 1)))
    data[-1] ^= 0xFF
    with pytest.raises(CorruptMessageError):
        OffsetsState().apply_chunk(bytes(data), "__consumer_offsets", 0)


def test_membership_snapshots_replay_to_the_latest_and_tombstones_remove_them() -> None:
    from logbroker.group.offsets import membership_batch

    data = _log(
        membership_batch("g", {"group_epoch": 1, "members": []}, 1),
        commit_batch("g", {("t", 0): (3, "")}, 2),
        membership_batch("g", {"group_epoch": 2, "members": []}, 3),
        membership_batch("h", {"group_epoch": 7, "members": []}, 4),
        membership_batch("h", None, 5),
    )
    state = OffsetsState()
    state.apply_chunk(data, "__consumer_offsets", 0)
    assert state.memberships == {"g": {"group_epoch": 2, "members": []}}
    assert state.groups["g"][("t", 0)].offset == 3 and state.skipped_records == 0


def test_oversized_membership_is_refused() -> None:
    from logbroker.group.offsets import MEMBERSHIP_MAX_BYTES, membership_batch

    with pytest.raises(ValueError):
        membership_batch("g", {"blob": "x" * MEMBERSHIP_MAX_BYTES}, 0)


def test_offsets_topic_is_created_compacted_and_keeps_its_other_configs() -> None:
    from logbroker.cluster.metadata import normalize_topic_config
    from logbroker.group.coordinator import CoordinatorConfig, offsets_topic_config
    from logbroker.storage.compaction import deletes_by_retention, is_compacted

    config = offsets_topic_config(CoordinatorConfig(offsets_topic_segment_bytes=1 << 16))
    assert config["cleanup_policy"] == "compact"
    assert (config["segment_bytes"], config["retention_ms"], config["retention_bytes"]) == (str(1 << 16), "-1", "-1")
    normalized = normalize_topic_config(config)  # a config the broker accepts as is
    assert is_compacted(normalized["cleanup_policy"]) and not deletes_by_retention(normalized["cleanup_policy"])


def test_replay_of_a_compacted_offsets_log_rebuilds_the_same_state() -> None:
    """Latest per key is exactly what replay keeps: commits keyed by (group, topic, partition),
    tombstones deleting them; the cleaned log (with offset gaps) replays to the same state."""
    from logbroker.storage.compaction import OffsetMap
    from logbroker.storage.segment_cleaner import clean_segment, map_segment

    batches = [commit_batch("g", {("t", 0): (i, ""), ("t", 1): (10 * i, "m")}, 1000 + i) for i in range(50)]
    batches += [commit_batch("gone", {("t", 0): (5, "")}, 2000), tombstone_batch("gone", [("t", 0)], 2001)]
    data = _log(*batches)
    full = OffsetsState()
    full.apply_chunk(data, "__consumer_offsets", 0)
    offsets = OffsetMap()
    assert map_segment(data, offsets)
    cleaned = clean_segment(data, offsets, tombstones_expired=True)
    assert len(cleaned) < len(data) // 10
    replayed = OffsetsState()
    replayed.apply_chunk(cleaned, "__consumer_offsets", 0)
    assert replayed.groups == full.groups
    assert {tp: c.offset for tp, c in replayed.groups["g"].items()} == {("t", 0): 49, ("t", 1): 490}
    assert "gone" not in replayed.groups


def test_replay_fast_paths_agree_with_decode_key_and_decode_value() -> None:
    """apply's cached (group, topic) names and its no-metadata value path (the replay's hot loop)
    give what decode_key and decode_value give, for every record, junk included."""
    b = rb.BatchBuilder(0)
    records: list[tuple[bytes | None, bytes | None]] = []
    for i in range(300):
        group, topic = f"group-{i % 3}", ("orders", "payments")[i % 2]
        value = encode_value(i, "" if i % 5 else f"meta-{i}", 1000 + i)
        if i % 17 == 0:  # junk: a negative offset in the no-metadata layout
            value = b"\x00\x00" + b"\xff" * 16 + b"\x00\x00"
        elif i % 19 == 0:  # junk: a value whose metadata length runs past its end
            value = encode_value(i, "", 0)[:-2] + b"\x00\x05"
        records.append((encode_key(group, topic, i % 7), None if i % 23 == 0 else value))
    records.append((encode_key("group-0", "orders", 0)[:-1], encode_value(1, "", 0)))  # same head, short key
    expected: dict[str, dict[tuple[str, int], tuple[int, str, int]]] = {}
    skipped = 0
    for key, value in records:
        b.append(0, key, value)
        try:
            parsed = decode_key(key)  # type: ignore[arg-type]
            assert parsed is not None
            group, topic, partition = parsed
            if value is None:
                expected.get(group, {}).pop((topic, partition), None)
                if group in expected and not expected[group]:
                    del expected[group]
                continue
            expected.setdefault(group, {})[(topic, partition)] = decode_value(value)
        except ValueError:
            skipped += 1
    state = OffsetsState()
    state.apply_chunk(_log(b.build()), "__consumer_offsets", 0)
    got = {g: {tp: (c.offset, c.metadata, c.commit_timestamp_ms) for tp, c in offsets.items()}
           for g, offsets in state.groups.items()}
    assert skipped >= 30
    assert (got, state.skipped_records, state.records_read) == (expected, skipped, len(records))
