"""Per-record cost of a broker-side filter (issue 17): evaluation alone, fast evaluator
(logbroker/group/filter_program.py) vs cel-python, and a whole filtered fetch (decode, evaluate,
re-encode: fetch_filter.filter_records) over 100-byte records, one in ten an EU invoice.

    PYTHONPATH=$PWD /work/main/.venv/bin/python -m bench.filter_cost
"""

from __future__ import annotations

import time

from logbroker.group.record_filter import compile_filter
from logbroker.server.apis.fetch_filter import filter_records
from logbroker.storage.record_batch import encode_batch, set_base_offset

EXPRESSION = 'headers["type"] == "invoice" && key.startsWith("eu-")'


def _records(n: int) -> list[tuple[int, bytes, bytes, list[tuple[str, bytes]]]]:
    return [(1_700_000_000_000 + i, f"{'eu' if i % 2 else 'us'}-{i}".encode(), b"v" * 100,
             [("type", b"invoice" if i % 10 == 0 else b"receipt")]) for i in range(n)]


def _per_record_us(fn: object, records: list, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for ts, key, _value, headers in records:
            fn(key, headers, ts)  # type: ignore[operator]
    return (time.perf_counter() - start) / (rounds * len(records)) * 1e6


def main() -> None:
    f = compile_filter(EXPRESSION)
    records = _records(1000)
    print(f"expression: {EXPRESSION}")
    print(f"translated: {f.fast is not None}")
    print(f"cel-python matches: {_per_record_us(f.matches_celpy, records, 2):8.2f} us/record")
    print(f"fast matches:       {_per_record_us(f.matches, records, 50):8.2f} us/record")
    data = bytearray()
    for base in range(0, 10_000, 100):  # batches of 100 records, as a producer sends them
        batch = bytearray(encode_batch(_records(100)))
        set_base_offset(batch, 0, base)
        data += batch
    buf = bytes(data)
    start = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        filter_records(buf, f, "t", 0)
    per = (time.perf_counter() - start) / (rounds * 10_000) * 1e6
    print(f"filter_records (decode + evaluate + re-encode, 10,000 records, {len(buf)} bytes): {per:.2f} us/record")
    print(f"  so 1 MiB of such records costs {per * (1 << 20) / (len(buf) / 10_000) / 1000:.1f} ms")


if __name__ == "__main__":
    main()
