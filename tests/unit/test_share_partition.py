"""The share-partition state machine (group/share_partition.py): pure, time injected."""

from __future__ import annotations

import pytest

from logbroker.errors import (
    InvalidConfigError,
    InvalidRecordStateError,
    InvalidRequestError,
    OffsetOutOfRangeError,
)
from logbroker.group.share_headers import REASON_EXPIRED, REASON_MAX_ATTEMPTS, REASON_REJECTED
from logbroker.group.share_partition import AckType, Acquired, SharePartition, key_hash
from logbroker.group.share_settings import ShareLimits, ShareSettings

S = ShareSettings(lock_ms=1_000, max_delivery_attempts=3, retry_backoff_ms=100, retry_backoff_max_ms=250,
                  max_in_flight_records=10)


def sp(start: int = 0, settings: ShareSettings = S) -> SharePartition:
    return SharePartition(settings, start)


def test_acquire_hands_out_each_available_record_once_in_offset_order() -> None:
    p = sp()
    p.add_records(0, 4, 1)
    got, dead = p.acquire("a", 3, now_ms=0)
    assert got == [Acquired(0, 2, 1)] and dead == []
    got, _ = p.acquire("b", 10, now_ms=0)
    assert got == [Acquired(3, 4, 1)]
    assert p.acquire("c", 10, now_ms=0)[0] == []


def test_accept_settles_and_moves_the_start_offset() -> None:
    p = sp()
    p.add_records(0, 4, 1)
    p.acquire("a", 5, 0)
    p.acknowledge("a", 1, 2, AckType.ACCEPT, 10)
    assert p.start_offset == 0  # 0 still held
    p.acknowledge("a", 0, 0, AckType.ACCEPT, 10)
    assert p.start_offset == 3 and p.window_size == 2
    assert p.counters.acknowledged == 3


def test_settling_a_record_not_held_changes_nothing() -> None:
    p = sp()
    p.add_records(0, 4, 1)
    p.acquire("a", 2, 0)
    before = p.snapshot()
    with pytest.raises(InvalidRecordStateError):
        p.acknowledge("b", 0, 0, AckType.ACCEPT, 1)  # another member's
    with pytest.raises(InvalidRecordStateError):
        p.acknowledge("a", 1, 2, AckType.ACCEPT, 1)  # 2 was never handed out: all or nothing
    with pytest.raises(OffsetOutOfRangeError):
        p.acknowledge("a", 0, 9, AckType.ACCEPT, 1)  # past the window
    with pytest.raises(InvalidRequestError):
        p.acknowledge("a", 0, 0, 9, 1)
    with pytest.raises(InvalidRequestError):
        p.acknowledge("a", 0, 0, AckType.RELEASE, 1, delay_ms=-1)
    assert p.snapshot() == before and p.held_by("a") == 2
    p.acknowledge("a", 1, 1, AckType.ACCEPT, 1)
    with pytest.raises(InvalidRecordStateError):  # a second ack, inside the window
        p.acknowledge("a", 1, 1, AckType.ACCEPT, 1)
    p.acknowledge("a", 0, 0, AckType.ACCEPT, 1)
    assert p.start_offset == 2
    with pytest.raises(InvalidRecordStateError):  # ...and below it
        p.acknowledge("a", 0, 0, AckType.ACCEPT, 1)
    with pytest.raises(OffsetOutOfRangeError):
        p.acknowledge("a", -1, 0, AckType.ACCEPT, 1)


def test_expired_lock_redelivers_with_a_higher_count_after_the_backoff() -> None:
    p = sp()
    p.add_records(0, 0, 1)
    p.acquire("a", 1, 0)
    assert p.expire(999) == []
    assert p.expire(1_000) == []  # lock ran out: available again after 100 ms (count 1)
    with pytest.raises(InvalidRecordStateError):
        p.acknowledge("a", 0, 0, AckType.ACCEPT, 1_001)
    assert p.acquire("b", 1, 1_050)[0] == []
    assert p.acquire("b", 1, 1_100)[0] == [Acquired(0, 0, 2)]
    assert p.counters.redelivered == 1


def test_release_backoff_doubles_up_to_the_cap_then_dead_letters() -> None:
    p = sp(settings=ShareSettings(lock_ms=1_000, max_delivery_attempts=4, retry_backoff_ms=100,
                                  retry_backoff_max_ms=250, max_in_flight_records=10))
    p.add_records(0, 0, 1)
    now = 0
    gaps = []
    for attempt in range(1, 5):
        got, _ = p.acquire("a", 1, now)
        assert got == [Acquired(0, 0, attempt)]
        dead = p.acknowledge("a", 0, 0, AckType.RELEASE, now)
        if attempt == 4:
            assert dead and dead[0].reason == REASON_MAX_ATTEMPTS and dead[0].delivery_count == 4
            break
        due = p.next_due_ms()
        assert due is not None
        gaps.append(due - now)
        now = due
    assert gaps == [100, 200, 250]
    assert p.start_offset == 1 and p.window_size == 0


def test_release_with_a_delay_and_reject() -> None:
    p = sp()
    p.add_records(0, 1, 1)
    p.acquire("a", 2, 0)
    assert p.acknowledge("a", 0, 0, AckType.RELEASE, 10, delay_ms=5_000) == []
    assert not p.available_now(5_009) and p.available_now(5_010)
    dead = p.acknowledge("a", 1, 1, AckType.REJECT, 10, reason="bad json")
    assert [(d.offset, d.reason, d.reason_text, d.delivery_count) for d in dead] == [(1, REASON_REJECTED, "bad json", 1)]


def test_renew_extends_the_lock() -> None:
    p = sp()
    p.add_records(0, 0, 1)
    p.acquire("a", 1, 0)
    p.acknowledge("a", 0, 0, AckType.RENEW, 900, delay_ms=5_000)
    assert p.expire(2_000) == []
    p.acknowledge("a", 0, 0, AckType.ACCEPT, 5_000)
    assert p.start_offset == 1


def test_a_member_leaving_gives_back_what_it_holds() -> None:
    p = sp(settings=ShareSettings(retry_backoff_ms=0, retry_backoff_max_ms=0))
    p.add_records(0, 3, 1)
    p.acquire("a", 2, 0)
    p.acquire("b", 2, 0)
    p.release_member("a", 5)
    assert p.acquire("c", 10, 5)[0] == [Acquired(0, 1, 2)]
    assert p.held_by("b") == 2


def test_the_window_is_bounded_and_gaps_are_settled() -> None:
    p = sp()
    assert p.room() == 10
    p.add_records(0, 4, 1)
    p.add_records(8, 9, 1)  # 5..7 compacted away
    assert p.window_size == 10 and p.room() == 0
    got, _ = p.acquire("a", 100, 0)
    assert got == [Acquired(0, 4, 1), Acquired(8, 9, 1)]
    p.acknowledge("a", 0, 4, AckType.ACCEPT, 1)
    assert p.start_offset == 8 and p.room() == 8


def test_ttl_expired_records_are_never_handed_out() -> None:
    p = sp(settings=ShareSettings(dead_letter_expired=True))
    p.add_records(0, 0, 1, expires_ms=100)
    p.add_records(1, 1, 1)
    got, dead = p.acquire("a", 10, 100)
    assert got == [Acquired(1, 1, 1)]
    assert [(d.offset, d.reason) for d in dead] == [(0, REASON_EXPIRED)]
    assert p.counters.expired == 1


def test_snapshot_round_trip_keeps_counts_and_frees_locks() -> None:
    p = sp(start=100)
    p.add_records(100, 105, 1)
    p.acquire("a", 3, 0)
    p.acknowledge("a", 101, 101, AckType.ACCEPT, 1)
    p.acknowledge("a", 102, 102, AckType.RELEASE, 1, delay_ms=50)
    q = SharePartition.restore(p.snapshot(), S)
    assert (q.start_offset, q.end_offset) == (100, 106)
    got, _ = q.acquire("z", 10, 10)
    # 100 was acquired (count 1) -> available with count 1 -> now 2; 102 not due until 51; 103.. fresh
    assert got == [Acquired(100, 100, 2), Acquired(103, 105, 1)]
    assert q.acquire("z", 10, 51)[0] == [Acquired(102, 102, 2)]


@pytest.mark.parametrize("junk", [b"", b"\x00" * 5, b"\x00\x01" + b"\x00" * 20,
                                  SharePartition(S, 0).snapshot()[:-1] + b"\x01"])
def test_restore_refuses_junk(junk: bytes) -> None:
    with pytest.raises(ValueError):
        SharePartition.restore(junk, S)


def test_describe_counts() -> None:
    p = sp()
    p.add_records(0, 3, 7)
    p.acquire("a", 1, 10)
    p.acquire("a", 1, 10)
    p.acknowledge("a", 1, 1, AckType.RELEASE, 10, delay_ms=100)
    d = p.describe(20)
    assert (d["in_flight"], d["acquired"], d["available"], d["delayed"]) == (4, 1, 2, 1)
    assert d["oldest_unsettled_age_ms"] == 13


def test_file_offset_clock_moves_by_the_files_number(tmp_path) -> None:
    import time as _time

    from logbroker.clock import FileOffsetClock

    f = tmp_path / "offset"
    clock = FileOffsetClock(str(f))
    base = _time.time_ns() // 1_000_000
    assert clock.now_ms() - base < 1_000  # no file: no offset
    f.write_text("3600000")
    assert clock.now_ms() - base >= 3_600_000
    f.write_text("junk")
    assert clock.now_ms() - base < 1_000


HOUR_MS = 3_600_000


def test_delayed_records_wait_outside_the_window_and_come_due_in_time_order() -> None:
    p = sp()  # window of 10
    for o in range(30):  # 30 records due in an hour (later offsets due sooner)
        p.add_records(o, o, 1, until_ms=HOUR_MS + 30 - o, now_ms=0)
    p.add_records(30, 34, 1, now_ms=0)
    assert p.room() == 5 and p.start_offset == 30  # the delayed ones hold no window slot
    assert p.acquire("a", 100, now_ms=10)[0] == [Acquired(30, 34, 1)]
    got, _ = p.acquire("a", 3, now_ms=HOUR_MS + 2)  # offsets 29 and 28 are due
    assert got == [Acquired(28, 29, 1)]
    assert p.describe(HOUR_MS + 2)["delayed"] == 28


def test_deferred_records_settle_retry_and_dead_letter_like_the_window() -> None:
    p = sp()
    p.add_records(0, 1, 1, until_ms=HOUR_MS, now_ms=0)
    p.add_records(2, 2, 1, now_ms=0)
    got, _ = p.acquire("a", 10, HOUR_MS)
    assert got == [Acquired(0, 2, 1)]  # a deferred run and a window record, merged in offset order
    with pytest.raises(InvalidRecordStateError):
        p.acknowledge("b", 0, 0, AckType.ACCEPT, HOUR_MS)
    p.acknowledge("a", 0, 2, AckType.RELEASE, HOUR_MS)  # spans both: all or nothing, offset by offset
    assert p.acquire("a", 10, HOUR_MS + 50)[0] == []
    assert p.acquire("a", 10, HOUR_MS + 100)[0] == [Acquired(0, 2, 2)]
    assert p.expire(HOUR_MS + 1_100) == []  # locks ran out: back after 200 ms
    assert p.acquire("a", 10, HOUR_MS + 1_300)[0] == [Acquired(0, 2, 3)]
    dead = p.acknowledge("a", 0, 1, AckType.RELEASE, HOUR_MS + 1_300)
    assert sorted((d.offset, d.reason) for d in dead) == [(0, REASON_MAX_ATTEMPTS), (1, REASON_MAX_ATTEMPTS)]
    p.acknowledge("a", 2, 2, AckType.ACCEPT, HOUR_MS + 1_300)
    assert len(p.deferred) == 0 and p.window_size == 0


def test_deferred_records_survive_a_snapshot_and_leave_with_their_member() -> None:
    p = sp()
    p.add_records(0, 4, 1, until_ms=HOUR_MS, now_ms=0)
    p.acquire("a", 2, HOUR_MS)
    chunks = {c: b for c, b in p.deferred.take_dirty().items() if b is not None}
    q = SharePartition.restore(p.snapshot(), S, chunks)
    assert len(q.deferred) == 5
    assert q.acquire("b", 10, HOUR_MS)[0] == [Acquired(0, 1, 2), Acquired(2, 4, 1)]
    q.release_member("b", HOUR_MS)
    assert q.held_by("b") == 0 and q.describe(HOUR_MS)["delayed"] == 5


def test_a_full_deferred_store_leaves_delayed_records_in_the_window() -> None:
    p = sp()
    p.deferred.capacity = 3
    p.add_records(0, 2, 1, until_ms=HOUR_MS, now_ms=0)
    p.add_records(3, 3, 1, until_ms=HOUR_MS, now_ms=0)
    assert len(p.deferred) == 3 and p.window_size == 1  # offset 3 waits in the window

def test_unacquire_gives_records_back_with_the_count_they_had() -> None:
    """Records acquired but not handed out (their batches could not be read) are available again at
    once, their delivery count as before; records settled or re-acquired meanwhile are left alone."""
    p = sp()
    p.add_records(0, 4, 1)
    first, _ = p.acquire("a", 5, now_ms=0)
    p.acknowledge("a", 3, 4, AckType.RELEASE, now_ms=0, delay_ms=1)
    again, _ = p.acquire("a", 5, now_ms=1)
    assert again == [Acquired(3, 4, 2)]
    assert p.counters.redelivered == 2
    p.acknowledge("a", 0, 0, AckType.ACCEPT, now_ms=1)
    p.unacquire("a", first + again)  # 0 settled: untouched; 1-2 back at count 0; 3-4 back at count 1
    assert p.counters.redelivered == 2  # a Prometheus counter: never taken back
    assert p.start_offset == 1 and p.held_by("a") == 0
    got, _ = p.acquire("b", 10, now_ms=1)
    assert got == [Acquired(1, 2, 1), Acquired(3, 4, 2)]
    p.unacquire("a", got)  # not a's: nothing changes
    assert p.held_by("b") == 4


# -- per-key FIFO (ordering="key") -------------------------------------------------------------------

K = ShareSettings(lock_ms=1_000, max_delivery_attempts=5, retry_backoff_ms=100, retry_backoff_max_ms=250,
                  max_in_flight_records=20, ordering="key")


def keyed(keys: list[bytes | None]) -> SharePartition:
    """A keyed partition holding one record per entry of `keys`, offsets from 0."""
    p = sp(settings=K)
    p.add_records(0, len(keys) - 1, 1, keys=[key_hash(k) for k in keys])
    return p


def offsets(runs: list[Acquired]) -> list[int]:
    return [o for r in runs for o in range(r.first_offset, r.last_offset + 1)]


def test_key_ordering_never_hands_out_two_records_of_one_key_at_once() -> None:
    p = keyed([b"a", b"a", b"b", None, b"a", b"b", None, b"c"])
    got, _ = p.acquire("m1", 100, 0)
    assert offsets(got) == [0, 2, 3, 6, 7]  # the heads of a, b, c and every record without a key
    assert p.acquire("m2", 100, 0)[0] == []
    p.acknowledge("m1", 0, 0, AckType.ACCEPT, 1)
    assert offsets(p.acquire("m2", 100, 1)[0]) == [1]  # a's next, and only it
    p.acknowledge("m1", 2, 2, AckType.ACCEPT, 1)
    p.acknowledge("m2", 1, 1, AckType.ACCEPT, 1)
    assert offsets(p.acquire("m2", 100, 1)[0]) == [4, 5]
    assert not p.available_now(1)


def test_a_released_record_still_comes_before_its_keys_later_records() -> None:
    p = keyed([b"a", b"a", b"b", b"b"])
    assert offsets(p.acquire("m1", 100, 0)[0]) == [0, 2]
    p.acknowledge("m1", 0, 0, AckType.RELEASE, 10)  # available again after the backoff (until 110)
    p.acknowledge("m1", 2, 2, AckType.ACCEPT, 10)
    assert offsets(p.acquire("m2", 100, 20)[0]) == [3]  # b goes on; a waits for offset 0
    assert not p.available_now(50)
    got, _ = p.acquire("m2", 100, 110)
    assert got == [Acquired(0, 0, 2)]
    p.acknowledge("m2", 0, 0, AckType.ACCEPT, 120)
    assert offsets(p.acquire("m1", 100, 120)[0]) == [1]


def test_lock_expiry_keeps_a_keys_order() -> None:
    p = keyed([b"a", b"a", b"a"])
    assert offsets(p.acquire("m1", 100, 0)[0]) == [0]
    assert p.expire(1_000) == []  # the lock on 0 ran out: available after the backoff
    assert p.acquire("m2", 100, 1_050)[0] == []  # 1 must not overtake 0
    assert p.acquire("m2", 100, 1_100)[0] == [Acquired(0, 0, 2)]
    p.acknowledge("m2", 0, 0, AckType.ACCEPT, 1_101)
    assert offsets(p.acquire("m1", 100, 1_101)[0]) == [1]


def test_a_dead_lettered_or_expired_head_unblocks_its_key() -> None:
    p = keyed([b"a", b"a"])
    p.acquire("m1", 1, 0)
    dead = p.acknowledge("m1", 0, 0, AckType.REJECT, 1)
    assert [d.offset for d in dead] == [0]
    assert offsets(p.acquire("m1", 100, 1)[0]) == [1]
    q = sp(settings=K)
    q.add_records(0, 0, 1, expires_ms=50, keys=[key_hash(b"a")])
    q.add_records(1, 1, 1, keys=[key_hash(b"a")])
    got, dead = q.acquire("m1", 100, 60)
    assert offsets(got) == [1] and [d.offset for d in dead] == [] and q.counters.expired == 1


def test_key_order_holds_after_a_restore() -> None:
    p = keyed([b"a", b"a", b"b", b"b", None])
    assert offsets(p.acquire("m1", 100, 0)[0]) == [0, 2, 4]
    p.acknowledge("m1", 2, 2, AckType.ACCEPT, 1)
    q = SharePartition.restore(p.snapshot(), K)  # a failover: the locks are gone, the keys are not
    assert offsets(q.acquire("m2", 100, 1)[0]) == [0, 3, 4]
    assert q.acquire("m3", 100, 1)[0] == []
    q.acknowledge("m2", 0, 0, AckType.ACCEPT, 2)
    assert offsets(q.acquire("m3", 100, 2)[0]) == [1]
    assert SharePartition.restore(q.snapshot(), K).snapshot() == SharePartition.restore(q.snapshot(), K).snapshot()


def test_unordered_snapshots_keep_version_1_and_bad_key_sections_are_refused() -> None:
    p = sp()
    p.add_records(0, 4, 1, keys=[key_hash(b"a")] * 5)  # ordering "none": keys are not kept
    assert p.snapshot()[:2] == b"\x00\x01"
    data = keyed([b"a", b"b"]).snapshot()
    assert data[:2] == b"\x00\x02"
    for junk in (data[:-1], data + b"x", data[:-12]):
        with pytest.raises(ValueError):
            SharePartition.restore(junk, K)


def test_with_key_ordering_delayed_records_stay_in_the_window() -> None:
    p = sp(settings=K)
    p.add_records(0, 0, 1, until_ms=HOUR_MS, now_ms=0, keys=[key_hash(b"a")])
    p.add_records(1, 1, 1, now_ms=0, keys=[key_hash(b"a")])
    p.add_records(2, 2, 1, now_ms=0, keys=[key_hash(b"b")])
    assert not p.deferred and p.window_size == 3
    assert offsets(p.acquire("m1", 100, 0)[0]) == [2]  # 1 waits behind its key's delayed record
    assert offsets(p.acquire("m1", 100, HOUR_MS)[0]) == [0]


def test_ordering_is_checked() -> None:
    with pytest.raises(InvalidConfigError):
        ShareSettings().updated({"ordering": "fifo"}, ShareLimits())
    assert ShareSettings().ordering == "none"
    assert ShareSettings.from_json(K.to_json()).ordering == "key"
