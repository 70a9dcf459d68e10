"""security/quotas.py: precedence, the sampled rate, the throttle time (no sockets; time as arguments)."""

from __future__ import annotations

import pytest

from logbroker.security.quotas import (
    DEFAULT,
    Quota,
    QuotaEntity,
    QuotaError,
    QuotaKind,
    QuotaManager,
    Rate,
)

P, F, R = QuotaKind.PRODUCE, QuotaKind.FETCH, QuotaKind.REQUEST


def q(user: str | None, client: str | None, **rates: float) -> Quota:
    return Quota(QuotaEntity(user, client), {QuotaKind(k): v for k, v in rates.items()}).validated()


def test_precedence_user_client_over_user_over_client_over_defaults() -> None:
    m = QuotaManager([q("alice", "app", producer_byte_rate=1), q("alice", None, producer_byte_rate=2),
                      q(None, "app", producer_byte_rate=3), q(DEFAULT, None, producer_byte_rate=4),
                      q(None, DEFAULT, producer_byte_rate=5)])
    assert m.quota_for(P, "alice", "app") == (1, ("alice", "app"))
    assert m.quota_for(P, "alice", "other") == (2, ("alice", None))
    assert m.quota_for(P, "bob", "app") == (4, ("bob", None))  # a user default beats a client id
    m.update([q(None, "app", producer_byte_rate=3), q(None, DEFAULT, producer_byte_rate=5)])
    assert m.quota_for(P, "bob", "app") == (3, (None, "app"))
    assert m.quota_for(P, "bob", "x") == (5, (None, "x"))  # the default applies to each client id
    assert m.quota_for(F, "bob", "x") is None  # each kind resolves on its own


def test_kinds_resolve_independently() -> None:
    m = QuotaManager([q("alice", "app", producer_byte_rate=1), q("alice", None, consumer_byte_rate=7)])
    assert m.quota_for(F, "alice", "app") == (7, ("alice", None))


def test_rate_averages_over_at_least_samples_minus_one_windows() -> None:
    r = Rate(samples=3, window_ms=1000)
    r.record(2000, 0)
    assert r.measure(0) == pytest.approx(1000.0)  # 2000 bytes over 2 windows
    r.record(2000, 2500)
    assert r.measure(2500) == pytest.approx(4000 / 2.5)
    assert r.measure(10_000) == 0.0  # every window expired


def test_throttle_brings_the_rate_back_to_the_quota() -> None:
    m = QuotaManager([q("alice", None, producer_byte_rate=1000)], samples=3, window_ms=1000)
    assert m.record(P, "alice", "", 1500, 0) == 0  # 750 B/s over the 2 s minimum span
    throttle = m.record(P, "alice", "", 1500, 100)  # 3000 B over 2 s = 1500 B/s
    assert throttle == 1000  # (1500 - 1000) / 1000 * 2000 ms
    assert m.record(P, "bob", "", 10**9, 100) == 0  # no quota for bob
    assert m.record(P, "alice", "", 10**12, 200) == 30_000  # bounded


def test_steady_producer_is_held_at_its_quota() -> None:
    """A producer that sends 10 KB and waits out each throttle sends ~quota bytes per second."""
    m = QuotaManager([q("alice", None, producer_byte_rate=10_000)])
    now, sent = 0.0, 0
    while now < 60_000:
        sent += 10_000
        now += m.record(P, "alice", "", 10_000, now) + 1
    assert sent / (now / 1000) == pytest.approx(10_000, rel=0.15)


def test_default_quota_is_per_user_not_shared() -> None:
    m = QuotaManager([q(DEFAULT, None, producer_byte_rate=1000)], samples=3, window_ms=1000)
    assert m.record(P, "alice", "", 2000, 0) == 0
    assert m.record(P, "bob", "", 2000, 0) == 0
    assert m.record(P, "alice", "", 2000, 1) > 0


def test_sensors_are_bounded() -> None:
    m = QuotaManager([q(DEFAULT, None, producer_byte_rate=1)], max_sensors=10)
    for i in range(100):
        m.record(P, f"u{i}", "", 1, 0)
    assert len(m._rates) == 10


@pytest.mark.parametrize("obj, msg", [
    ({"user": "a", "producer_byte_rate": -1}, "producer_byte_rate must be"),
    ({"user": "a", "request_percentage": 0}, "request_percentage must be"),
    ({"producer_byte_rate": 5}, "names a user, a client id"),
    ({"user": "", "producer_byte_rate": 5}, "user must be"),
    ({"user": "a", "bogus": 5}, "unknown quota fields"),
    ({"user": "a", "consumer_byte_rate": float("nan")}, "consumer_byte_rate must be"),
])
def test_bad_quotas_are_refused(obj: dict[str, object], msg: str) -> None:
    with pytest.raises(QuotaError, match=msg):
        Quota.from_json(obj)


def test_json_round_trip() -> None:
    quota = q("alice", DEFAULT, producer_byte_rate=5, request_percentage=50)
    assert Quota.from_json(quota.to_json()) == quota
    assert quota.to_json() == {"user": "alice", "client_id": DEFAULT, "producer_byte_rate": 5.0,
                               "request_percentage": 50.0}


def test_a_throttle_appended_to_a_serialized_fetch_response_is_read() -> None:
    from logbroker.server.apis.throttling import with_throttle
    from logbroker.v1 import logbroker_pb2 as pb

    raw = pb.FetchResponse(results=[pb.FetchPartitionResult(topic="t", partition=3)]).SerializeToString()
    for throttle in (1, 127, 128, 30_000):
        out = with_throttle(raw, throttle)
        assert isinstance(out, bytes)
        parsed = pb.FetchResponse.FromString(out)
        assert parsed.throttle_time_ms == throttle and parsed.results[0].partition == 3
    produce = with_throttle(pb.ProduceResponse(), 5)
    assert isinstance(produce, pb.ProduceResponse) and produce.throttle_time_ms == 5


def test_the_request_time_of_a_call_counts_only_its_steps_on_the_loop() -> None:
    import asyncio
    import time

    from logbroker.server.apis.throttling import _Timed

    async def call() -> str:
        await asyncio.sleep(0.2)  # waiting (a long poll): not counted
        deadline = time.perf_counter() + 0.05
        while time.perf_counter() < deadline:  # busy on the loop: counted
            pass
        return "done"

    async def main() -> tuple[str, float]:
        timed = _Timed(call())
        return await timed, timed.loop_ms

    result, loop_ms = asyncio.run(main())
    assert result == "done" and 45 <= loop_ms < 150


def test_client_quotas_skip_brokers_and_throttle_produce_over_quota() -> None:
    import asyncio

    from logbroker.clock import ManualClock
    from logbroker.server.apis.throttling import ClientQuotas
    from logbroker.server.request_context import RequestContext
    from logbroker.v1 import logbroker_pb2 as pb

    quotas = ClientQuotas(QuotaManager(samples=3), ManualClock(), max_delay_ms=1, cluster_secret=b"s3cret")
    produce = pb.ProduceRequest(partitions=[pb.ProducePartition(topic="t", records=b"x" * 1500)])
    alice = RequestContext(principal="User:alice", client_id="app")
    assert not quotas.applies("Produce", alice, produce)  # no quota at all: untouched
    quotas.manager.update([q(None, "app", producer_byte_rate=1000)])
    assert quotas.applies("Produce", alice, produce)
    broker = RequestContext(presented_cluster_secret=b"s3cret")
    assert not quotas.applies("Produce", broker, produce)
    assert quotas.applies("Produce", RequestContext(presented_cluster_secret=b"guess"), produce)
    assert not quotas.applies("Fetch", alice, pb.FetchRequest(replica_id=2))

    async def answer() -> pb.ProduceResponse:
        return pb.ProduceResponse()

    async def main() -> list[int]:
        out = []
        for _ in range(3):
            resp = await quotas.run("Produce", alice, produce, answer())
            assert isinstance(resp, pb.ProduceResponse)
            out.append(resp.throttle_time_ms)
        return out

    throttles = asyncio.run(main())
    assert throttles == [0, 1000, 2500]  # 1500, 3000, 4500 B over the 2 s span at 1000 B/s
    assert quotas.throttled_calls == 2


def test_a_client_waits_out_a_throttle_from_when_it_sent_the_request() -> None:
    from logbroker.client.throttle import MAX_THROTTLE_MS, BrokerThrottle

    t = BrokerThrottle()
    assert t.on_response("b1", 10.0, 0) is None and t.blocked_until("b1", 10.0) is None
    assert t.on_response("b1", 10.0, 500) == 10.5
    assert t.blocked_until("b1", 10.2) == 10.5 and t.blocked_until("b2", 10.2) is None
    assert t.on_response("b1", 9.0, 100) == 9.1  # an older answer does not shorten the wait
    assert t.blocked_until("b1", 10.4) == 10.5
    assert t.blocked_until("b1", 10.5) is None
    assert t.on_response("b1", 0.0, 10**9) == MAX_THROTTLE_MS / 1000
    assert (t.throttled_responses, t.last_throttle_time_ms) == (3, MAX_THROTTLE_MS)
