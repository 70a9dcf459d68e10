"""The idempotent producer state of one partition (storage/producer_state.py), pure."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.clock import ManualClock
from logbroker.storage.producer_state import (
    BATCHES_KEPT,
    INT32_MAX,
    ProducerStateMap,
    Verdict,
    sequence_after,
)


def _append(state: ProducerStateMap, pid: int, epoch: int, seq: int, n: int, offset: int, ts: int = 0) -> None:
    assert state.check(pid, epoch, seq, n).verdict is Verdict.APPEND
    state.record(pid, epoch, seq, n, offset, offset + n - 1, ts)


def test_unknown_producer_accepts_any_sequence() -> None:
    state = ProducerStateMap()
    assert state.check(7, 0, 0, 3).verdict is Verdict.APPEND
    assert state.check(7, 0, 1234, 3).verdict is Verdict.APPEND


def test_in_sequence_appends_and_duplicate_answers_original_offsets() -> None:
    state = ProducerStateMap()
    _append(state, 7, 0, 0, 3, offset=10)
    _append(state, 7, 0, 3, 2, offset=20)
    dup = state.check(7, 0, 0, 3)
    assert (dup.verdict, dup.first_offset, dup.last_offset) == (Verdict.DUPLICATE, 10, 12)
    dup = state.check(7, 0, 3, 2)
    assert (dup.verdict, dup.first_offset, dup.last_offset) == (Verdict.DUPLICATE, 20, 21)
    assert state.check(7, 0, 5, 1).verdict is Verdict.APPEND


def test_gap_and_overlap_are_out_of_order() -> None:
    state = ProducerStateMap()
    _append(state, 7, 0, 0, 3, offset=0)
    gap = state.check(7, 0, 4, 1)
    assert gap.verdict is Verdict.OUT_OF_ORDER and "expected 3" in gap.message
    assert state.check(7, 0, 1, 2).verdict is Verdict.OUT_OF_ORDER  # overlaps, not the same batch


def test_older_epoch_is_fenced_newer_starts_at_zero() -> None:
    state = ProducerStateMap()
    _append(state, 7, 2, 0, 3, offset=0)
    assert state.check(7, 1, 3, 1).verdict is Verdict.FENCED
    assert state.check(7, 3, 5, 1).verdict is Verdict.OUT_OF_ORDER
    _append(state, 7, 3, 0, 1, offset=3)
    entry = state.entry(7)
    assert entry is not None and entry.epoch == 3 and len(entry.batches) == 1
    assert state.check(7, 3, 0, 1).verdict is Verdict.DUPLICATE
    assert state.check(7, 2, 0, 3).verdict is Verdict.FENCED


def test_only_the_last_five_batches_are_kept() -> None:
    state = ProducerStateMap()
    for i in range(BATCHES_KEPT + 2):
        _append(state, 1, 0, i, 1, offset=i)
    assert state.check(1, 0, 0, 1).verdict is Verdict.OUT_OF_ORDER  # too old to answer as a duplicate
    assert state.check(1, 0, 2, 1).verdict is Verdict.DUPLICATE
    assert state.check(1, 0, BATCHES_KEPT + 2, 1).verdict is Verdict.APPEND


def test_sequence_wraps_as_int32() -> None:
    assert sequence_after(INT32_MAX, 1) == 0
    assert sequence_after(INT32_MAX - 1, 3) == 1
    state = ProducerStateMap()
    _append(state, 1, 0, INT32_MAX - 1, 3, offset=0)  # INT32_MAX-1, INT32_MAX, 0
    assert state.check(1, 0, 1, 1).verdict is Verdict.APPEND
    assert state.check(1, 0, INT32_MAX - 1, 3).verdict is Verdict.DUPLICATE


def test_expiry_with_an_injected_clock() -> None:
    clock = ManualClock()
    state = ProducerStateMap(expiration_ms=1000)
    _append(state, 1, 0, 0, 1, offset=0, ts=clock.now_ms())
    clock.advance(500)
    _append(state, 2, 0, 0, 1, offset=1, ts=clock.now_ms())
    clock.advance(600)
    assert state.expire(clock.now_ms()) == 1
    assert state.entry(1) is None and state.entry(2) is not None
    assert state.check(1, 0, 42, 1).verdict is Verdict.APPEND  # expired: unknown again


def test_producer_bound_drops_the_least_recently_recorded() -> None:
    state = ProducerStateMap(producers_max=2)
    _append(state, 1, 0, 0, 1, offset=0)
    _append(state, 2, 0, 0, 1, offset=1)
    _append(state, 1, 0, 1, 1, offset=2)
    _append(state, 3, 0, 0, 1, offset=3)
    assert len(state) == 2 and state.entry(2) is None and state.entry(1) is not None


def test_truncation_forgets_batches_past_the_offset() -> None:
    state = ProducerStateMap()
    _append(state, 1, 0, 0, 2, offset=0)
    _append(state, 1, 0, 2, 2, offset=2)
    _append(state, 2, 0, 0, 1, offset=4)
    state.truncate_to(2)
    assert state.entry(2) is None
    assert state.check(1, 0, 2, 2).verdict is Verdict.APPEND  # the truncated batch may come again
    assert state.check(1, 0, 0, 2).verdict is Verdict.DUPLICATE


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, INT32_MAX), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=12),
    resend=st.integers(0, 11), gap=st.integers(1, 1000),
)
def test_any_in_order_stream_dedups_recent_resends_and_refuses_gaps(
    start: int, sizes: list[int], resend: int, gap: int
) -> None:
    state = ProducerStateMap()
    seq, offset, sent = start, 0, []
    for n in sizes:
        result = state.check(9, 0, seq, n)
        assert result.verdict is Verdict.APPEND
        state.record(9, 0, seq, n, offset, offset + n - 1, 0)
        sent.append((seq, n, offset))
        seq, offset = sequence_after(seq, n), offset + n
    old_seq, old_n, old_offset = sent[resend % len(sent)]
    verdict = state.check(9, 0, old_seq, old_n)
    if resend % len(sent) >= len(sent) - BATCHES_KEPT:
        assert (verdict.verdict, verdict.first_offset) == (Verdict.DUPLICATE, old_offset)
    else:
        assert verdict.verdict is Verdict.OUT_OF_ORDER
    assert state.check(9, 0, sequence_after(seq, gap), 1).verdict is Verdict.OUT_OF_ORDER
