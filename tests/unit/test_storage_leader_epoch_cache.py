"""LeaderEpochCache: assign, end offset for epoch, truncate from start and end (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logbroker.errors import CorruptMessageError
from logbroker.storage.leader_epoch_cache import UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET, LeaderEpochCache

UNDEFINED = (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET)


def test_empty_history():
    cache = LeaderEpochCache()
    assert cache.entries == [] and len(cache) == 0
    assert cache.latest_epoch == UNDEFINED_EPOCH and cache.latest_start_offset == 0
    assert cache.end_offset_for_epoch(0, 10) == UNDEFINED


def test_assign_starts_a_new_epoch_and_keeps_the_latest_unchanged():
    cache = LeaderEpochCache().assign(1, 0)
    assert cache.entries == [(1, 0)]
    assert cache.assign(1, 5) is cache  # the latest epoch goes on: the same object
    later = cache.assign(3, 10)
    assert later.entries == [(1, 0), (3, 10)] and later.latest_epoch == 3 and later.latest_start_offset == 10
    assert cache.entries == [(1, 0)]  # immutable: the old history is unchanged


def test_assign_drops_epochs_that_got_no_batch():
    cache = LeaderEpochCache([(1, 0), (2, 10), (3, 10)])
    assert cache.assign(4, 10).entries == [(1, 0), (4, 10)]
    assert cache.assign(2, 10).entries == [(1, 0), (2, 10)]  # 3 started at 10 without data


def test_assign_refuses_epochs_going_backwards():
    cache = LeaderEpochCache([(1, 0), (3, 10)])
    with pytest.raises(CorruptMessageError):
        cache.assign(2, 15)
    assert cache.entries == [(1, 0), (3, 10)]


def test_end_offset_for_epoch():
    cache = LeaderEpochCache([(1, 0), (3, 10), (5, 20)])
    assert cache.end_offset_for_epoch(5, 30) == (5, 30)  # the latest: the log end offset
    assert cache.end_offset_for_epoch(3, 30) == (3, 20)
    assert cache.end_offset_for_epoch(4, 30) == (3, 20)  # no epoch 4: the largest below it
    assert cache.end_offset_for_epoch(1, 30) == (1, 10)
    assert cache.end_offset_for_epoch(0, 30) == (0, 0)  # below the first: it ends where 1 starts
    assert cache.end_offset_for_epoch(6, 30) == UNDEFINED
    assert cache.end_offset_for_epoch(UNDEFINED_EPOCH, 30) == UNDEFINED


def test_truncate_from_end():
    cache = LeaderEpochCache([(1, 0), (3, 10), (5, 20)])
    assert cache.truncate_from_end(20).entries == [(1, 0), (3, 10)]
    assert cache.truncate_from_end(21).entries == [(1, 0), (3, 10), (5, 20)]
    assert cache.truncate_from_end(0).entries == []


def test_truncate_from_start_moves_the_spanning_epoch():
    cache = LeaderEpochCache([(1, 0), (3, 10), (5, 20)])
    assert cache.truncate_from_start(0).entries == [(1, 0), (3, 10), (5, 20)]
    assert cache.truncate_from_start(15).entries == [(3, 15), (5, 20)]
    assert cache.truncate_from_start(20).entries == [(5, 20)]
    assert cache.truncate_from_start(99).entries == [(5, 99)]


def test_prefix_suffix_and_common_prefix():
    a = LeaderEpochCache([(1, 0), (3, 10)])
    b = LeaderEpochCache([(1, 0), (4, 10)])
    assert a.common_prefix_length(b) == 1 and a.common_prefix_length(a) == 2
    assert a.prefix(1) == LeaderEpochCache([(1, 0)]) and a.prefix(5) is a
    assert a.suffix(1) == [(3, 10)]
    assert a.append([]) is a and a.append([(7, 30)]).entries == [(1, 0), (3, 10), (7, 30)]


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 40)), max_size=30))
def test_assign_keeps_epochs_and_starts_strictly_increasing(steps):
    cache = LeaderEpochCache()
    for epoch, start in steps:
        try:
            cache = cache.assign(epoch, start)
        except CorruptMessageError:
            continue
        entries = cache.entries
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(entries, entries[1:], strict=False))
        assert cache.latest_epoch == epoch
