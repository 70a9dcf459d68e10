"""`python -m bench.mirror [--records N] [--load-s S]`: `logbroker mirror` throughput and lag (issue 21).

Two clusters on loopback, each its own ZooKeeper and one broker (`--standalone`: two standalone
brokers, each its own data directory), one topic of 6 partitions on A,
records of at most 100 bytes (a 100-byte value, a key, a header, a timestamp), the mirror
(logbroker/mirror/mirror.py) in this process on a thread:

- `copy_records_per_s`: N records produced to A first, then the mirror started: N / the time until
  B holds all N (topic creation and the first assignment included);
- `lag`: a producer sends as fast as it can for S seconds while the mirror runs; the mirror's own
  lag (A's high watermark minus the mirrored position, summed over partitions) is sampled every
  0.5 s: p50 and max, the producer's records/s, the mirror's records/s meanwhile, and `catch_up_s`,
  from the producer's end until B holds everything;
- `equal`: at the end every record of both sides is read back and hashed per partition (BLAKE2b
  over key, value, headers without the mirror's own `logbroker.mirror.src`, timestamp, in offset
  order): `equal` is true when both sides' counts and digests match for every partition (the
  issue's "1,000,000 records copied with equal content": `--records 1000000`). Exit 1 when not.

Prints one JSON object. Not run by the test suite's benchmark smoke; results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.cluster import LogbrokerCluster
from logbroker import Admin, Consumer, Producer
from logbroker.mirror import progress
from logbroker.mirror.mirror import Mirror, MirrorSettings
from logbroker.testing import BrokerProcess, free_port

TOPIC = "mirror-bench"
PARTITIONS = 6
RECORD = b"m" * 100
BATCH = 1000
BASE_TS_MS = 1_700_000_000_000
SAMPLE_S = 0.5
TIMEOUT_S = 600.0


def _target_count(admin: Admin) -> int:
    try:
        return sum(p.high_watermark for p in admin.describe_topic(TOPIC).partitions)
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _wait_count(admin: Admin, n: int) -> float:
    start = time.monotonic()
    while _target_count(admin) < n:
        if time.monotonic() - start > TIMEOUT_S:
            raise RuntimeError(f"the target did not reach {n} records in {TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return time.monotonic()


def _send_batch(p: Producer, first: int, count: int) -> None:
    """Records first..first+count-1: distinct 100-byte values and keys; a header and a timestamp per batch."""
    values = [b"%012d" % n + RECORD[12:] for n in range(first, first + count)]
    keys = [b"k%d" % (n % 10_007) for n in range(first, first + count)]
    p.send_many(TOPIC, values, keys, partition=(first // BATCH) % PARTITIONS,
                headers=[("batch", b"%d" % (first // BATCH)), ("empty", None)], timestamp_ms=BASE_TS_MS + first)


def _produce(bootstrap: str, n: int) -> None:
    with Producer(bootstrap, linger_ms=5) as p:
        for i in range(0, n, BATCH):
            _send_batch(p, i, min(BATCH, n - i))
        p.flush(timeout=TIMEOUT_S)


def _load(bootstrap: str, first: int, seconds: float, sent: list[int]) -> None:
    with Producer(bootstrap, linger_ms=5) as p:
        end = time.monotonic() + seconds
        n = first
        while time.monotonic() < end:
            _send_batch(p, n, BATCH // 10)
            n += BATCH // 10
        p.flush(timeout=TIMEOUT_S)
    sent.append(n - first)


def _field(h: Any, data: bytes | None) -> None:
    h.update(b"\xff\xff\xff\xff" if data is None else struct.pack(">I", len(data)) + data)


def checksums(bootstrap: str, ends: list[int]) -> list[tuple[int, str]]:
    """Per partition: (records, BLAKE2b over key, value, headers (the mirror's own removed), timestamp)."""
    digests = [hashlib.blake2b(digest_size=16) for _ in ends]
    counts = [0] * len(ends)
    with Consumer(bootstrap, enable_auto_commit=False, max_poll_records=10_000) as c:
        c.assign([(TOPIC, p) for p in range(len(ends))])
        c.seek_to_beginning()
        deadline = time.monotonic() + TIMEOUT_S
        while any(c.position(TOPIC, p) < end for p, end in enumerate(ends)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not read {sum(ends)} records of {bootstrap} in {TIMEOUT_S:.0f} s")
            for m in c.poll(timeout_ms=500):
                if m.offset >= ends[m.partition]:
                    continue
                h = digests[m.partition]
                _field(h, m.key)
                _field(h, m.value)
                headers = [x for x in m.headers if x[0] != progress.SRC_HEADER]
                h.update(struct.pack(">Iq", len(headers), m.timestamp))
                for name, value in headers:
                    _field(h, name.encode())
                    _field(h, value)
                counts[m.partition] += 1
    return [(n, d.hexdigest()) for n, d in zip(counts, digests, strict=True)]


def _ends(admin: Admin) -> list[int]:
    return [p.high_watermark for p in admin.describe_topic(TOPIC).partitions]


def _equal(a: str, b: str, admin_a: Admin, admin_b: Admin) -> dict[str, Any]:
    ends_a, ends_b = _ends(admin_a), _ends(admin_b)
    start = time.monotonic()
    sums_a = checksums(a, ends_a)
    sums_b = checksums(b, ends_b)
    return {"equal": ends_a == ends_b and sums_a == sums_b, "records_a": sum(ends_a), "records_b": sum(ends_b),
            "checksums_a": [d for _n, d in sums_a], "checksums_b": [d for _n, d in sums_b],
            "check_s": round(time.monotonic() - start, 2)}


@contextlib.contextmanager
def _clusters(workdir: Path, standalone: bool) -> Iterator[tuple[str, str]]:
    """The bootstraps of A and B: each its own ZooKeeper and broker, or two standalone brokers."""
    if standalone:
        a = BrokerProcess(workdir / "a" / "data", free_port()).start()
        try:
            b = BrokerProcess(workdir / "b" / "data", free_port()).start()
            try:
                yield a.bootstrap, b.bootstrap
            finally:
                b.stop()
        finally:
            a.stop()
        return
    ca = LogbrokerCluster(workdir / "a", 1)
    try:
        ca.start()
        cb = LogbrokerCluster(workdir / "b", 1)
        try:
            cb.start()
            yield ca.bootstrap, cb.bootstrap
        finally:
            cb.stop()
    finally:
        ca.stop()


def run(records: int, load_s: float, workdir: Path, standalone: bool = False) -> dict[str, Any]:
    with _clusters(workdir, standalone) as (boot_a, boot_b):
        with Admin(boot_a) as admin_a, Admin(boot_b) as admin_b:
            admin_a.create_topic(TOPIC, PARTITIONS)
            _produce(boot_a, records)
            mirror = Mirror(MirrorSettings(source=boot_a, target=boot_b, topics=TOPIC, group="mirror-bench"))
            thread = threading.Thread(target=mirror.run, name="mirror", daemon=True)
            start = time.monotonic()
            thread.start()
            copy_s = _wait_count(admin_b, records) - start
            sent: list[int] = []
            loader = threading.Thread(target=_load, args=(boot_a, records, load_s, sent), daemon=True)
            load_start, copied_before = time.monotonic(), mirror.copied
            loader.start()
            lags = []
            while loader.is_alive():
                try:
                    lags.append(sum(mirror.lag().values()))  # read from this thread: a sample, not exact
                except RuntimeError:  # the assignment changed under us: skip this sample
                    pass
                loader.join(SAMPLE_S)
            load_end, copied_under_load = time.monotonic(), mirror.copied - copied_before
            done = _wait_count(admin_b, records + sent[0])
            mirror.stop()
            thread.join(60)
            equality = _equal(boot_a, boot_b, admin_a, admin_b)
        return {
            "records": records, "record_bytes": len(RECORD), "partitions": PARTITIONS,
            "copy_s": round(copy_s, 2), "copy_records_per_s": round(records / copy_s),
            "load_s": round(load_end - load_start, 2), "load_records_per_s": round(sent[0] / (load_end - load_start)),
            "lag_p50": statistics.median(lags) if lags else None, "lag_max": max(lags) if lags else None,
            "mirror_records_per_s_under_load": round(copied_under_load / (load_end - load_start)),
            "catch_up_s": round(done - load_end, 2), **equality,
            "clusters": "standalone" if standalone else "zookeeper",
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mirror", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--load-s", type=float, default=10.0)
    parser.add_argument("--standalone", action="store_true", help="two standalone brokers instead of two clusters")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as d:
        result = run(args.records, args.load_s, Path(d), args.standalone)
    print(json.dumps(result))
    if not result["equal"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
