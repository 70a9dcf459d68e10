"""The worker's pure core: in-flight window, lanes (ordering), contiguous commit marks, retry policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.storage.record_batch import Message
from logbroker.worker.retry import RetryPolicy
from logbroker.worker.window import ENTRY_OVERHEAD_BYTES, EntryState, InFlightWindow


def msg(partition: int, offset: int, key: bytes | None = None, value: bytes = b"v", topic: str = "t") -> Message:
    return Message(topic, partition, offset, key, value, [], 0)


def drain_ready(w: InFlightWindow):
    out = []
    while (e := w.next_ready()) is not None:
        out.append(e)
    return out


def test_partition_ordering_runs_one_record_per_partition_round_robin():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 0), msg(0, 1), msg(1, 0), msg(0, 2), msg(1, 1)])
    ready = drain_ready(w)
    assert [(e.message.partition, e.message.offset) for e in ready] == [(0, 0), (1, 0)]
    assert w.running == 2 and w.records == 5
    assert w.complete(ready[1])
    e = w.next_ready()
    assert (e.message.partition, e.message.offset) == (1, 1)
    assert w.next_ready() is None  # partition 0 still busy
    assert w.complete(ready[0])
    assert w.next_ready().message.offset == 1
    assert w.commit_offsets() == {("t", 0): 1, ("t", 1): 1}


def test_commit_mark_is_next_offset_after_contiguous_done_and_only_reported_when_moved():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 10), msg(0, 11), msg(0, 12)])
    assert w.commit_offsets() == {}  # nothing done: nothing to commit
    a = w.next_ready()
    w.complete(a)
    assert w.commit_offsets() == {("t", 0): 11}
    w.mark_committed({("t", 0): 11})
    assert w.commit_offsets() == {}
    w.complete(w.next_ready())
    w.complete(w.next_ready())
    assert w.commit_offsets() == {("t", 0): 13}
    assert w.records == 0 and w.bytes == 0 and w.free_records() == 100


def test_gaps_in_offsets_commit_past_the_last_done_record():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 3), msg(0, 7), msg(0, 20)])  # compacted / control batches in between
    w.complete(w.next_ready())
    assert w.commit_offsets() == {("t", 0): 7}  # 4..6 do not exist: the head record's offset
    w.complete(w.next_ready())
    w.complete(w.next_ready())
    assert w.commit_offsets() == {("t", 0): 21}


def test_unordered_completion_commits_only_the_contiguous_low_water_mark():
    w = InFlightWindow(100, 1 << 20, ordering="none")
    w.add([msg(0, i) for i in range(5)])
    es = drain_ready(w)
    assert len(es) == 5  # no lane constraint
    for i in (4, 2, 1):
        w.complete(es[i])
    assert w.commit_offsets() == {}  # offset 0 still running
    assert w.records == 5  # finished-but-waiting records still count against the window
    w.complete(es[0])
    assert w.commit_offsets() == {("t", 0): 3}
    assert w.records == 2
    w.complete(es[3])
    assert w.commit_offsets() == {("t", 0): 5}


def test_key_ordering_serialises_a_key_and_parallelises_keys_and_null_keys():
    w = InFlightWindow(100, 1 << 20, ordering="key")
    w.add([msg(0, 0, b"a"), msg(0, 1, b"a"), msg(0, 2, b"b"), msg(0, 3, None), msg(0, 4, None), msg(1, 5, b"a")])
    es = drain_ready(w)
    assert sorted(e.message.offset for e in es) == [0, 2, 3, 4, 5]  # 1 waits for 0 (same key, same partition)
    first = next(e for e in es if e.message.offset == 0)
    w.complete(first)
    assert w.next_ready().message.offset == 1


def test_window_bounds_records_and_bytes():
    w = InFlightWindow(3, 1 << 20)
    w.add([msg(0, 0), msg(0, 1)])
    assert w.free_records() == 1
    w.add([msg(0, 2)])
    assert w.free_records() == 0
    with pytest.raises(AssertionError):
        w.add([msg(0, 3)])
    size = ENTRY_OVERHEAD_BYTES + 1000
    b = InFlightWindow(100, 2 * size)
    b.add([msg(0, 0, value=b"x" * 1000)])
    assert b.bytes == size and b.free_records() == 99
    b.add([msg(0, 1, value=b"x" * 1000)])
    assert b.free_records() == 0  # bytes bound reached
    b.complete(b.next_ready())
    assert b.free_records() == 99


def test_drop_queued_hands_records_back_uncommitted():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 0), msg(0, 1), msg(0, 2), msg(1, 0), msg(1, 1)])
    r0, r1 = drain_ready(w)
    assert w.drop_queued([("t", 0)]) == 2
    w.complete(r0)
    assert w.next_ready() is None  # partition 0's queued records are gone ...
    w.complete(r1)
    assert w.next_ready().message.offset == 1  # ... partition 1's are not
    assert w.commit_offsets() == {("t", 0): 1, ("t", 1): 1}  # never past the first dropped record
    assert w.drop_queued() == 0


def test_fail_blocks_the_lane_and_the_commit_mark():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 0), msg(0, 1), msg(0, 2)])
    w.complete(w.next_ready())
    e = w.next_ready()
    w.fail(e)
    assert e.state is EntryState.ABANDONED and w.running == 0
    assert w.next_ready() is None
    assert w.commit_offsets() == {("t", 0): 1}
    assert not w.complete(e)  # a late completion of a failed record changes nothing
    assert w.commit_offsets() == {("t", 0): 1}


def test_forget_ignores_late_completions_and_a_new_generation_is_independent():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 0), msg(0, 1)])
    old = w.next_ready()
    w.forget([("t", 0)])
    assert w.partitions() == set() and w.records == 0 and w.running == 1
    # re-assigned at offset 0 while the old record still runs: the new one is not blocked by it
    w.add([msg(0, 0), msg(0, 1)])
    new = w.next_ready()
    assert new is not None and new.message.offset == 0
    assert not w.complete(old)
    assert w.running == 1 and w.commit_offsets() == {}
    w.complete(new)
    assert w.commit_offsets() == {("t", 0): 1}


def test_offsets_going_backwards_start_a_new_generation():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 5), msg(0, 6)])
    w.complete(w.next_ready())
    w.add([msg(0, 2)])  # the consumer reset to an earlier offset (log truncated and rewritten)
    assert w.records == 1
    e = w.next_ready()
    assert e.message.offset == 2
    w.complete(e)
    assert w.commit_offsets() == {("t", 0): 3}


def test_running_in_counts_current_generation_only():
    w = InFlightWindow(100, 1 << 20)
    w.add([msg(0, 0), msg(1, 0)])
    drain_ready(w)
    assert w.running_in([("t", 0)]) == 1 and w.running_in([("t", 0), ("t", 1)]) == 2
    assert w.running_in([("other", 0)]) == 0


def lane_of(m: Message, ordering: str) -> object:
    if ordering == "partition":
        return m.partition
    if ordering == "key" and m.key is not None:
        return (m.partition, m.key)
    return None  # unordered


@settings(max_examples=200, deadline=None)
@given(
    ordering=st.sampled_from(["partition", "key", "none"]),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 120),
    cap=st.integers(1, 30),
)
def test_random_schedules_keep_order_bounds_and_never_commit_past_an_unfinished_record(ordering, seed, n, cap):
    rng = random.Random(seed)
    # three partitions, offsets with random gaps, a few keys
    logs = {p: [] for p in range(3)}
    for _ in range(n):
        p = rng.randrange(3)
        prev = logs[p][-1].offset if logs[p] else -1
        logs[p].append(msg(p, prev + rng.choice((1, 1, 1, 2, 5)), key=rng.choice((b"a", b"b", None))))
    positions = dict.fromkeys(logs, 0)
    w = InFlightWindow(cap, 1 << 30, ordering=ordering)
    running = []
    done: set[tuple[int, int]] = set()
    started_order: dict[object, list[int]] = {}
    committed = {}
    while len(done) < n:
        action = rng.random()
        free = w.free_records()
        if action < 0.4 and free:
            batch = []
            for p in rng.sample(range(3), 3):
                take = logs[p][positions[p] : positions[p] + rng.randint(0, free - len(batch))]
                positions[p] += len(take)
                batch.extend(take)
            w.add(batch)
            assert w.records <= cap
        elif action < 0.7:
            e = w.next_ready()
            if e is not None:
                m = e.message
                lane = lane_of(m, ordering)
                if lane is not None:
                    seen = started_order.setdefault(lane, [])
                    assert not seen or seen[-1] < m.offset  # order within a lane
                    # no other record of the lane is running
                    assert all(lane_of(r.message, ordering) != lane for r in running)
                    seen.append(m.offset)
                running.append(e)
        elif running:
            e = running.pop(rng.randrange(len(running)))
            assert w.complete(e)
            done.add((e.message.partition, e.message.offset))
        offsets = w.commit_offsets()
        for (_, p), off in offsets.items():
            assert off > committed.get(p, -1)
            # everything below the commit mark is done; nothing at or above it is assumed done
            assert all((p, m.offset) in done for m in logs[p] if m.offset < off)
            committed[p] = off
        w.mark_committed(offsets)
        if not running and w.free_records() == 0:
            e = w.next_ready()
            assert e is not None, "stuck: window full, nothing runnable"
            running.append(e)
    for p, log in logs.items():
        if log:
            assert committed[p] == log[-1].offset + 1
    assert w.records == 0 and w.bytes == 0


def test_retry_policy_backs_off_exponentially_up_to_a_cap_then_gives_up():
    r = RetryPolicy(retries=4, backoff_ms=100, backoff_max_ms=300)
    assert [r.delay_ms(i) for i in range(1, 6)] == [100, 200, 300, 300, None]
    assert RetryPolicy(retries=0).delay_ms(1) is None
    assert RetryPolicy(retries=100, backoff_ms=1, backoff_max_ms=1000).delay_ms(100) == 1000
    for bad in ({"retries": -1}, {"retries": 101}, {"backoff_ms": -1}, {"backoff_max_ms": 10**9}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_window_rejects_bad_bounds():
    with pytest.raises(ValueError):
        InFlightWindow(0, 1)
    with pytest.raises(ValueError):
        InFlightWindow(1, 1, ordering="random")  # type: ignore[arg-type]
