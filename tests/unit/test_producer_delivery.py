"""Producer.send(delay_ms=, deliver_at_ms=, ttl_ms=): the share-group delivery headers, checked at send."""

from __future__ import annotations

import time

import pytest

from logbroker.client.producer import Producer
from logbroker.client.producer.delivery import delivery_headers, with_delivery_headers
from logbroker.group import share_headers as sh
from tests.unit.test_client_fakes import FakeMetadata
from tests.unit.test_client_producer import records_of


def test_delay_becomes_a_delivery_time_from_now():
    assert delivery_headers(1_000, 500, None, None) == [(sh.DELIVER_AT_MS, b"1500")]
    assert delivery_headers(1_000, None, 7_000, 60_000) == [(sh.DELIVER_AT_MS, b"7000"), (sh.TTL_MS, b"60000")]
    assert delivery_headers(1_000, None, None, None) == []
    assert delivery_headers(1_000, sh.DELAY_MAX_MS, None, sh.TTL_MAX_MS)[1] == (sh.TTL_MS, str(sh.TTL_MAX_MS).encode())


@pytest.mark.parametrize("args", [
    (-1, None, None), (None, -1, None), (None, None, -1), (1, 5, None),
    (sh.DELAY_MAX_MS + 1, None, None), (None, 1_000 + sh.DELAY_MAX_MS + 1, None), (None, None, sh.TTL_MAX_MS + 1),
])
def test_bad_delivery_arguments_raise(args):
    with pytest.raises(ValueError):
        delivery_headers(1_000, *args)


def test_existing_delivery_headers_are_replaced_and_others_kept():
    out = with_delivery_headers({"a": b"1", sh.TTL_MS: b"5"}, 0, None, None, 10)
    assert out == [("a", b"1"), (sh.TTL_MS, b"10")]
    assert with_delivery_headers(None, 0, 3, None, None) == [(sh.DELIVER_AT_MS, b"3")]


def test_send_writes_the_headers_and_refuses_bad_values_without_queueing():
    md = FakeMetadata({"t": 1})
    with Producer(md) as p:
        before_ms = time.time_ns() // 1_000_000
        p.send("t", b"later", headers=[("x", b"y")], delay_ms=2_000, ttl_ms=60_000).result(5)
        after_ms = time.time_ns() // 1_000_000
        p.send("t", b"at", deliver_at_ms=before_ms + 10).result(5)
        p.send("t", b"plain").result(5)
        with pytest.raises(ValueError):
            p.send("t", b"bad", delay_ms=-5)
        with pytest.raises(ValueError):
            p.send("t", b"bad", ttl_ms=sh.TTL_MAX_MS + 1)
        p.flush(5)
    later, at, plain = records_of(md, "t", 0)
    headers = dict(later.headers)
    assert headers["x"] == b"y"
    assert before_ms + 2_000 <= int(headers[sh.DELIVER_AT_MS]) <= after_ms + 2_000
    assert headers[sh.TTL_MS] == b"60000"
    assert dict(at.headers) == {sh.DELIVER_AT_MS: str(before_ms + 10).encode()}
    assert plain.headers == ()
