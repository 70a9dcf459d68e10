"""`python -m bench.mirror [--records N] [--load-s S]`: `logbroker mirror` throughput and lag (issue 21).

Two standalone brokers on loopback (each its own data directory), one topic of 6 partitions on A,
100-byte records, the mirror (logbroker/mirror/mirror.py) in this process on a thread:

- `copy_records_per_s`: N records produced to A first, then the mirror started: N / the time until
  B holds all N (topic creation and the first assignment included);
- `lag`: a producer sends as fast as it can for S seconds while the mirror runs; the mirror's own
  lag (A's high watermark minus the mirrored position, summed over partitions) is sampled every
  0.5 s: p50 and max, the producer's records/s, and `catch_up_s`, from the producer's end until B
  holds everything.

Prints one JSON object. Not run by the test suite's benchmark smoke; results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from logbroker import Admin, Producer
from logbroker.mirror.mirror import Mirror, MirrorSettings
from logbroker.testing import BrokerProcess, free_port

TOPIC = "mirror-bench"
PARTITIONS = 6
RECORD = b"m" * 100
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


def _produce(bootstrap: str, n: int) -> None:
    with Producer(bootstrap, linger_ms=5) as p:
        for i in range(0, n, 1000):
            p.send_many(TOPIC, [RECORD] * min(1000, n - i), partition=(i // 1000) % PARTITIONS)
        p.flush(timeout=TIMEOUT_S)


def _load(bootstrap: str, seconds: float, sent: list[int]) -> None:
    with Producer(bootstrap, linger_ms=5) as p:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            p.send_many(TOPIC, [RECORD] * 100, partition=i % PARTITIONS)
            i += 1
        p.flush(timeout=TIMEOUT_S)
    sent.append(i * 100)


def run(records: int, load_s: float, workdir: Path) -> dict[str, Any]:
    a = BrokerProcess(workdir / "a" / "data", free_port()).start()
    b = BrokerProcess(workdir / "b" / "data", free_port()).start()
    try:
        with Admin(a.bootstrap) as admin_a, Admin(b.bootstrap) as admin_b:
            admin_a.create_topic(TOPIC, PARTITIONS)
            _produce(a.bootstrap, records)
            mirror = Mirror(MirrorSettings(source=a.bootstrap, target=b.bootstrap, topics=TOPIC, group="mirror-bench"))
            thread = threading.Thread(target=mirror.run, name="mirror", daemon=True)
            start = time.monotonic()
            thread.start()
            copy_s = _wait_count(admin_b, records) - start
            sent: list[int] = []
            loader = threading.Thread(target=_load, args=(a.bootstrap, load_s, sent), daemon=True)
            load_start = time.monotonic()
            loader.start()
            lags = []
            while loader.is_alive():
                try:
                    lags.append(sum(mirror.lag().values()))  # read from this thread: a sample, not exact
                except RuntimeError:  # the assignment changed under us: skip this sample
                    pass
                loader.join(SAMPLE_S)
            load_end = time.monotonic()
            done = _wait_count(admin_b, records + sent[0])
            mirror.stop()
            thread.join(60)
        return {
            "records": records, "record_bytes": len(RECORD), "partitions": PARTITIONS,
            "copy_s": round(copy_s, 2), "copy_records_per_s": round(records / copy_s),
            "load_s": round(load_end - load_start, 2), "load_records_per_s": round(sent[0] / (load_end - load_start)),
            "lag_p50": statistics.median(lags) if lags else None, "lag_max": max(lags) if lags else None,
            "catch_up_s": round(done - load_end, 2),
        }
    finally:
        a.stop()
        b.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mirror", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--load-s", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as d:
        print(json.dumps(run(args.records, args.load_s, Path(d))))


if __name__ == "__main__":
    main()
