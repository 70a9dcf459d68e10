"""kill -9 in the middle of a sustained produce; damaged segment tails repaired on restart."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.storage import record_batch as rb
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(240)


def consume_all(address: str, topic: str, partitions: int, expected_total: int | None = None,
                idle_polls: int = 5) -> dict[int, list]:
    out: dict[int, list] = {p: [] for p in range(partitions)}
    with Consumer(address, topics=None, auto_offset_reset="earliest") as c:
        c.assign([(topic, p) for p in range(partitions)])
        idle = 0
        while idle < idle_polls:
            batch = c.poll(timeout_ms=300)
            if not batch:
                idle += 1
                continue
            idle = 0
            for m in batch:
                out[m.partition].append(m)
            if expected_total is not None and sum(len(v) for v in out.values()) >= expected_total:
                break
    return out


def test_kill_9_during_sustained_produce_keeps_every_acknowledged_record(broker_factory, tmp_path):
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("events", partitions=3, config={"segment_bytes": str(256 << 10)})
    acked: dict[bytes, tuple[int, int]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def on_done(value: bytes):
        def cb(fut):
            if fut.exception() is None:
                md = fut.result()
                with lock:
                    acked[value] = (md.partition, md.offset)
        return cb

    producer = Producer(broker.address, acks=1, linger_ms=2, batch_size_bytes=64 << 10,
                        delivery_timeout_ms=4000, request_timeout_ms=2000, retry_backoff_ms=50)

    def produce_loop():
        i = 0
        while not stop.is_set() and i < 5_000_000:
            value = b"rec-%09d" % i
            try:
                producer.send("events", value, key=b"k%d" % (i % 50)).add_done_callback(on_done(value))
            except Exception:
                pass
            i += 1

    t = threading.Thread(target=produce_loop, daemon=True)
    t.start()
    wait_for(lambda: len(acked) >= 30_000, 60, "30k acknowledged records")
    broker.kill(signal.SIGKILL)
    acked_at_kill = len(acked)
    stop.set()
    t.join(30)
    producer.close(timeout=10)
    assert len(acked) >= acked_at_kill

    broker2 = broker_factory(data_dir=broker.data_dir, port=broker.port)
    got = consume_all(broker2.address, "events", 3)
    by_value = {}
    for p, msgs in got.items():
        offsets = [m.offset for m in msgs]
        assert offsets == list(range(len(offsets))), f"partition {p}: gaps or duplicates"
        for m in msgs:
            by_value[m.value] = (m.partition, m.offset)
    missing = [v for v, where in acked.items() if by_value.get(v) != where]
    assert not missing, f"{len(missing)} acknowledged records lost or moved, e.g. {missing[:3]}"
    # the restarted broker takes new writes after what survived
    with Producer(broker2.address, acks="all") as p2:
        md = p2.send("events", b"after", partition=0).result(timeout=30)
    assert md.offset == len(got[0])


def _segment_files(data_dir: Path, topic: str, partition: int) -> list[Path]:
    return sorted((data_dir / f"{topic}-{partition}").glob("*.log"))


def _batch_positions(data: bytes) -> list[tuple[int, int]]:
    """(position, size) of each well-formed batch at the start of a segment file."""
    out = []
    pos = 0
    while len(data) - pos >= rb.HEADER_SIZE:
        h = rb.parse_header(data, pos)
        if h.batch_length < rb.MIN_BATCH_LENGTH or h.magic != rb.MAGIC:
            break  # the preallocated zero tail
        out.append((pos, h.batch_length + rb.LOG_OVERHEAD))
        pos += h.batch_length + rb.LOG_OVERHEAD
    return out


@pytest.mark.parametrize("damage", ["truncate", "garble"])
@pytest.mark.parametrize("shutdown", ["kill", "term"])
def test_damaged_segment_tail_is_repaired_and_never_served(broker_factory, damage, shutdown):
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("d", partitions=1)
    with Producer(broker.address, acks=1, linger_ms=0) as producer:
        for i in range(20):
            producer.send("d", b"batch-%02d" % i, partition=0).result(timeout=30)  # one batch each
    if shutdown == "kill":
        broker.kill(signal.SIGKILL)
    else:
        assert broker.stop() == 0
    seg = _segment_files(broker.data_dir, "d", 0)[-1]
    data = seg.read_bytes()
    batches = _batch_positions(data)
    assert len(batches) == 20
    pos, size = batches[15]
    if damage == "truncate":
        with open(seg, "r+b") as f:
            f.truncate(pos + size // 2)
    else:
        with open(seg, "r+b") as f:
            f.seek(pos + size - 3)
            f.write(b"\xde\xad\xbe")
    broker2 = broker_factory(data_dir=broker.data_dir, port=broker.port)
    got = consume_all(broker2.address, "d", 1)[0]
    assert [m.value for m in got] == [b"batch-%02d" % i for i in range(15)]
    log_text = broker2.log_text()
    assert "recovery" in log_text.lower() and "truncat" in log_text.lower(), log_text[-2000:]
    with Producer(broker2.address, acks=1) as producer:
        assert producer.send("d", b"new", partition=0).result(timeout=30).offset == 15
