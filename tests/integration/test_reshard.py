"""Adding partitions keeps per-key order (cluster/lineage.py): a standalone broker, a keyed producer
producing all along, a group consumer (or a share group's QueueConsumer) reading all along, the
topic grown from 6 to 8 partitions half-way. No send fails (the producer re-routes a batch refused
for a moved key by itself: client/producer/reroute.py), every key's consumed order equals its
produced order, and only the keys whose hash moved change partition."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from collections import defaultdict
from typing import Any

import grpc
import pytest

from logbroker.client.admin import Admin
from logbroker.client.consumer import Consumer
from logbroker.client.producer import Producer
from logbroker.client.queue import QueueConsumer
from logbroker.cluster.hashing import partition_for_key
from logbroker.errors import PartitionCountChangedError
from logbroker.storage import record_batch as rb
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import REPO, BrokerProcess, wait_for

KEYS = [f"k{i}".encode() for i in range(120)]
ROUNDS = 60
GROW_AT_ROUND = 20


class Produced:
    """Per key, the sequence numbers the broker acknowledged, and the failures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[bytes, list[int]] = defaultdict(list)
        self.failed: list[BaseException] = []
        self.rounds = 0

    def done(self, key: bytes, seq: int, fut: object) -> None:
        err = fut.exception(0)  # type: ignore[attr-defined]
        with self.lock:
            if err is None:
                self.acked[key].append(seq)
            else:
                self.failed.append(err)


def _produce(bootstrap: str, produced: Produced, stop: threading.Event, options: dict[str, Any]) -> None:
    # metadata re-read every second: without the broker's check, its records of moved keys would go
    # on landing in the old partitions for up to a second after the growth
    with Producer(bootstrap, linger_ms=2, metadata_max_age_ms=1000, **options) as producer:
        for seq in range(ROUNDS):
            if stop.is_set():
                return
            for key in KEYS:
                fut = producer.send("rs", f"{key.decode()}:{seq}".encode(), key=key)
                fut.add_done_callback(functools.partial(produced.done, key, seq))
            producer.flush(30)
            with produced.lock:
                produced.rounds = seq + 1


def _run(bootstrap: str, reader: Any, ack: bool, producer_options: dict[str, Any] | None = None,
         ) -> tuple[Produced, dict[bytes, list[tuple[int, int]]], dict[int, dict[int, int]]]:
    """Produce all along, grow the topic from 6 to 8 partitions half-way, read until every
    acknowledged record has been read: what was produced, what was read, and the lineage."""
    produced = Produced()
    consumed: dict[bytes, list[tuple[int, int]]] = defaultdict(list)  # key -> [(seq, partition)]
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(bootstrap, produced, stop, producer_options or {}), daemon=True)
    total = [0]

    def poll() -> bool:
        """Read what has come (False, to chain into a wait_for condition)."""
        for m in reader.poll(100):
            assert m.key is not None and m.value is not None
            consumed[m.key].append((int(m.value.split(b":")[1]), m.partition))
            total[0] += 1
            if ack:
                m.ack()
        return False

    producer.start()
    try:
        wait_for(lambda: poll() or produced.rounds >= GROW_AT_ROUND // 2, 60, "rounds before the growth")
        # the reader falls behind across the growth, so it has parent records to finish when the
        # new partitions already hold records of the moved keys
        wait_for(lambda: produced.rounds >= GROW_AT_ROUND, 60, "rounds before the growth")
        with Admin(bootstrap) as admin:
            admin.create_partitions("rs", 8)
            lineage = {p.partition: p.parents for p in admin.describe_topic("rs").partitions}
        wait_for(lambda: produced.rounds >= GROW_AT_ROUND + 10, 60, "rounds after the growth")
        wait_for(lambda: poll() or not producer.is_alive(), 120, "the producer to finish")
        acked = sum(len(v) for v in produced.acked.values())
        wait_for(lambda: poll() or total[0] >= acked, 60, f"all {acked} acknowledged records consumed")
        for _ in range(5):
            poll()  # anything beyond (a duplicate) would show in the comparison
    finally:
        stop.set()
        producer.join(60)
    return produced, consumed, lineage


def _check(produced: Produced, consumed: dict[bytes, list[tuple[int, int]]], lineage: dict[int, dict[int, int]]) -> None:
    assert all(not lineage[p] for p in range(6))
    assert set(lineage[6]) == set(range(6)) and lineage[6] == lineage[7]
    # a batch refused for a moved key is re-routed by the producer itself (client/producer/reroute.py):
    # nothing fails across the growth
    assert produced.failed == [], produced.failed[:3]
    assert produced.rounds == ROUNDS
    for key in KEYS:
        assert sorted(produced.acked[key]) == list(range(ROUNDS)), key  # every record acknowledged once
        assert [s for s, _ in consumed[key]] == list(range(ROUNDS)), key  # read in the order sent
        before, after = partition_for_key(key, 6), partition_for_key(key, 8)
        partitions = {p for _, p in consumed[key]}
        assert partitions <= {before, after}, (key, partitions)
        if before == after:
            assert partitions == {before}
    moved = [k for k in KEYS if partition_for_key(k, 6) != partition_for_key(k, 8)]
    assert 0 < len(moved) < len(KEYS) * 0.25 * 1.5
    for key in moved:  # each moved key's last records came from its new partition
        assert consumed[key][-1][1] == partition_for_key(key, 8), key


# Small batches: several per partition and round, so an idempotent producer has batches in flight
# behind a refused one (refused out of sequence, re-routed after it) and a plain one has batches
# queued behind it.
@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "plain"])
def test_a_group_keeps_every_keys_order_across_added_partitions(broker: BrokerProcess, idempotent: bool) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("rs", partitions=6)
    options = {"enable_idempotence": idempotent, "batch_size_bytes": 256}
    with Consumer(broker.address, ["rs"], "reshard", auto_offset_reset="earliest", auto_commit_interval_ms=200) as c:
        _check(*_run(broker.address, c, ack=False, producer_options=options))


def test_a_share_group_keeps_every_keys_order_across_added_partitions(broker: BrokerProcess) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("rs", partitions=6)
    with QueueConsumer(broker.address, "reshard-q", ["rs"], auto_offset_reset="earliest", ordering="key") as q:
        _check(*_run(broker.address, q, ack=True))


def _cli(bootstrap: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "logbroker", *args, "--bootstrap", bootstrap],
                          capture_output=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_topics_describe_shows_the_lineage_and_it_survives_a_restart(broker: BrokerProcess) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("lin", partitions=2)
    with Producer(broker.address) as producer:
        for i in range(30):
            producer.send("lin", b"v", key=f"k{i}".encode())
        producer.flush(30)
    with Admin(broker.address) as admin:
        ends = [p.log_end_offset for p in admin.describe_topic("lin").partitions]
        admin.create_partitions("lin", 3)
    assert sum(ends) == 30
    broker.restart()
    table = _cli(broker.address, "topics", "describe", "lin")
    assert f"SPLIT FROM 0@{ends[0]},1@{ends[1]}" in table.splitlines()[-1]
    assert "SPLIT" not in "".join(table.splitlines()[:-1])
    parts = json.loads(_cli(broker.address, "topics", "describe", "lin", "--format", "json"))["partitions"]
    assert [p["parents"] for p in parts] == [{}, {}, {"0": ends[0], "1": ends[1]}]


def test_a_misplaced_key_is_refused_after_growth_unless_the_topic_opts_out(broker: BrokerProcess) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("on", partitions=2)
        admin.create_topic("off", partitions=2, config={"key_order_on_growth": "false"})
        admin.create_partitions("on", 3)
        admin.create_partitions("off", 3)
        assert all(not p.parents for p in admin.describe_topic("off").partitions)
    key = next(f"k{i}".encode() for i in range(1000) if partition_for_key(f"k{i}".encode(), 3) == 2)
    with Producer(broker.address, enable_idempotence=False) as producer:
        with pytest.raises(PartitionCountChangedError):
            producer.send("on", b"v", key=key, partition=0).result(30)
        assert producer.send("on", b"v", key=key).result(30).partition == 2
        assert producer.send("off", b"v", key=key, partition=0).result(30).partition == 0


def test_the_broker_checks_a_grown_topics_keys_only_below_the_declared_partition_count(broker: BrokerProcess) -> None:
    """keys_placed_by_partitions: a batch placed by the topic's current count is taken as it is (the
    broker decodes nothing); one declaring an older count, or none, has its keys checked."""
    with Admin(broker.address) as admin:
        admin.create_topic("decl", partitions=2)
        admin.create_partitions("decl", 3)
    key = next(f"k{i}".encode() for i in range(1000) if partition_for_key(f"k{i}".encode(), 3) == 2)
    batch = rb.encode_batch([(1000, key, b"v", None)])  # a key of partition 2, sent to partition 0
    with grpc.insecure_channel(broker.address) as channel:
        stub = pbg.BrokerStub(channel)

        def produce(declared: int) -> pb.ProducePartitionResult:
            return stub.Produce(pb.ProduceRequest(acks=1, timeout_ms=5000, partitions=[pb.ProducePartition(
                topic="decl", partition=0, records=batch, keys_placed_by_partitions=declared)]), timeout=30).results[0]

        for declared in (0, 2):
            assert produce(declared).error_code == pb.PARTITION_COUNT_CHANGED, declared
        assert produce(3).error_code == pb.NONE  # the producer's word: no key decoded
