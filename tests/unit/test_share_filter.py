"""Share-group filters: records the group's filter does not match are settled as they enter the
window (share_partition.add_filtered, share_coordinator._add_batch), never handed out; the filter
is the group's (share_settings.filter), checked like the consumer's."""

from __future__ import annotations

import pytest

from logbroker.client.queue.queue_consumer import share_settings
from logbroker.errors import InvalidFilterError
from logbroker.group.record_filter import compile_filter
from logbroker.group.share_coordinator import _add_batch, _check_member_filter
from logbroker.group.share_group import ShareGroup
from logbroker.group.share_partition import Acquired, RecordState, SharePartition
from logbroker.group.share_settings import ShareLimits, ShareSettings
from logbroker.storage.record_batch import encode_batch, iter_batches, set_base_offset
from logbroker.v1 import logbroker_pb2 as pb

S = ShareSettings(max_in_flight_records=100)
INVOICES = 'headers["type"] == "invoice"'


def test_filtered_records_are_settled_never_handed_out_and_move_the_start_offset() -> None:
    p = SharePartition(S, 0)
    p.add_filtered(0, 2, 1)          # not matched: settled at once, the start moves past them
    assert p.start_offset == 3 and p.end_offset == 3
    p.add_records(3, 3, 1)
    p.add_filtered(5, 6, 1)          # 4: no record (a gap), settled too
    assert p.end_offset == 7 and p.start_offset == 3
    got, dead = p.acquire("m", 10, now_ms=0)
    assert got == [Acquired(3, 3, 1)] and dead == []
    p.acknowledge("m", 3, 3, 1, 0)
    assert p.start_offset == 7 and p.window_size == 0
    assert p.counters.filtered == 5 and p.counters.acknowledged == 1 and p.counters.dead_lettered == 0
    p.add_filtered(0, 6, 1)          # read twice: ignored
    assert p.end_offset == 7 and p.counters.filtered == 5


def test_filtered_records_behind_an_unsettled_one_survive_a_snapshot_settled() -> None:
    p = SharePartition(S, 0)
    p.add_records(0, 0, 1)
    p.add_filtered(1, 3, 1)
    restored = SharePartition.restore(p.snapshot(), S)
    assert restored.start_offset == 0 and restored.end_offset == 4
    assert restored._state[1:4] == bytes([RecordState.ARCHIVED]) * 3
    assert restored.acquire("m", 10, 0)[0] == [Acquired(0, 0, 1)]


def _batch(base: int, types: list[str]) -> bytes:
    buf = bytearray(encode_batch([(1000 + i, f"k{i}".encode(), b"v", [("type", t.encode())] if t else [])
                                  for i, t in enumerate(types)]))
    set_base_offset(buf, 0, base)
    return bytes(buf)


def test_add_batch_puts_only_matching_records_in_the_window() -> None:
    data = _batch(0, ["invoice", "receipt", "receipt", "invoice", "", "invoice", "receipt"])
    p = SharePartition(S, 0)
    h, pos = next(iter_batches(data))
    _add_batch(p, data, pos, h, h.last_offset, ("t", 0), -1, 0, compile_filter(INVOICES))
    assert p.end_offset == 7 and p.counters.filtered == 4  # a record without the header: no match
    got, _ = p.acquire("m", 10, now_ms=0)
    assert got == [Acquired(0, 0, 1), Acquired(3, 3, 1), Acquired(5, 5, 1)]
    unfiltered = SharePartition(S, 0)
    _add_batch(unfiltered, data, pos, h, h.last_offset, ("t", 0), -1, 0)
    assert unfiltered.acquire("m", 10, now_ms=0)[0] == [Acquired(0, 6, 1)]


def test_add_batch_with_nothing_matching_settles_the_whole_batch() -> None:
    data = _batch(10, ["receipt"] * 5)
    p = SharePartition(S, 10)
    h, pos = next(iter_batches(data))
    _add_batch(p, data, pos, h, h.last_offset, ("t", 0), -1, 0, compile_filter(INVOICES))
    assert p.start_offset == p.end_offset == 15 and p.acquire("m", 10, 0)[0] == []


def test_the_filter_is_a_checked_group_setting() -> None:
    s = ShareSettings().updated({"filter": INVOICES}, ShareLimits())
    assert s.filter == INVOICES and ShareSettings.from_json(s.to_json()).filter == INVOICES
    with pytest.raises(InvalidFilterError, match="does not parse"):
        ShareSettings().updated({"filter": 'headers["type" =='}, ShareLimits())
    with pytest.raises(InvalidFilterError, match="matches\\(\\) is not allowed"):
        ShareSettings().updated({"filter": 'key.matches("a+")'}, ShareLimits())
    assert ShareSettings().updated({"filter": ""}, ShareLimits()).filter == ""


def test_a_member_joins_with_the_groups_filter_or_none() -> None:
    g = ShareGroup("q", ShareSettings(filter=INVOICES), session_timeout_ms=1000, members_max=10)
    _check_member_filter(g, pb.ShareGroupSettings())                   # says nothing: takes the group's
    _check_member_filter(g, pb.ShareGroupSettings(filter=INVOICES))    # the same one
    with pytest.raises(InvalidFilterError, match="has filter 'headers\\[\"type\"\\] == \"invoice\"'") as info:
        _check_member_filter(g, pb.ShareGroupSettings(filter='key == "x"'))
    assert info.value.code == pb.INVALID_FILTER
    bare = ShareGroup("b", ShareSettings(), session_timeout_ms=1000, members_max=10)
    with pytest.raises(InvalidFilterError, match="has filter none"):
        _check_member_filter(bare, pb.ShareGroupSettings(filter=INVOICES))


def test_client_checks_the_filter_before_any_call() -> None:
    assert share_settings(filter=INVOICES).filter == INVOICES
    assert not share_settings().HasField("filter")
    with pytest.raises(InvalidFilterError, match="does not parse"):
        share_settings(filter="key ==")


def test_queue_consumer_refuses_a_bad_filter_at_construction() -> None:
    from logbroker.client.queue.queue_consumer import QueueConsumer

    with pytest.raises(InvalidFilterError, match="does not parse"):
        QueueConsumer("127.0.0.1:1", "g", ["t"], filter='headers["type"')
