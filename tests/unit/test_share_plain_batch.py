"""A batch joins a share partition's window without decoding its records when nothing in it needs
them (group/share_coordinator.py `_add_plain_batch`): the window ends up as the decoding path
leaves it; a batch with a delivery header, a corrupt one, or a filtered group's is decoded."""

from __future__ import annotations

import dataclasses

import pytest

from logbroker.errors import CorruptMessageError
from logbroker.group import share_coordinator as sc
from logbroker.group import share_headers as H
from logbroker.group.share_partition import SharePartition
from logbroker.group.share_settings import ShareSettings
from logbroker.storage.record_batch import BatchBuilder, iter_batches

NOW_MS = 1_700_000_000_000


def batch(headers: list[tuple[str, bytes | None]]) -> bytes:
    b = BatchBuilder(NOW_MS)
    for i in range(5):
        b.append(NOW_MS, None, b"v%d" % i, [*headers, ("correlation_id", b"c%d" % i)])
    return b.build()


def window(data: bytes, plain: bool, settings: ShareSettings | None = None) -> tuple[int, list[tuple[int, int]], bool]:
    """(end offset, acquired runs, whether the plain path took it) after adding `data`'s batch."""
    sp = SharePartition(settings or ShareSettings(), 0)
    ((h, pos),) = list(iter_batches(data))
    took = sc._add_plain_batch(sp, data, pos, h, h.last_offset, -1, NOW_MS, None) if plain else False
    if not took:
        sc._add_batch(sp, data, pos, h, h.last_offset, ("t", 0), -1, NOW_MS, None)
    runs, _ = sp.acquire("m", 100, NOW_MS)
    return sp.end_offset, [(r.first_offset, r.last_offset) for r in runs], took


def test_a_plain_batch_joins_as_the_decoding_path_leaves_it() -> None:
    data = batch([("reply_to", b"0:" + b"ab" * 16)])
    assert window(data, plain=True) == (5, [(0, 4)], True)
    assert window(data, plain=False)[:2] == (5, [(0, 4)])


def test_delivery_headers_key_ordering_and_corruption_take_the_decoding_path() -> None:
    delayed = batch([(H.DELIVER_AT_MS, str(NOW_MS + 60_000).encode())])
    assert window(delayed, plain=True) == (5, [], False)  # not deliverable yet: decoded, deferred
    keyed = dataclasses.replace(ShareSettings(), ordering="key")
    assert window(batch([]), plain=True, settings=keyed)[2] is False
    corrupt = bytearray(batch([]))
    corrupt[-1] ^= 0xFF
    with pytest.raises(CorruptMessageError):
        window(bytes(corrupt), plain=True)
