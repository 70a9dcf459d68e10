"""`python -m bench.key_check`: what a grown topic's key check costs the broker per batch (issue 21).

A produce batch for a topic that grew is decoded and its keys hashed (server/apis/produce_fetch.py
`check_keys_placed`) unless the producer declares the current partition count
(`keys_placed_by_partitions`, cluster/lineage.py). This times that check on one core: a batch of
7,000 records of 100 B (keys all of partition 3 of 8, so nothing is refused), `--calls` times.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from logbroker.cluster.hashing import partition_for_key
from logbroker.server.apis.produce_fetch import check_keys_placed
from logbroker.storage import record_batch as rb

RECORDS = 7_000
PARTITIONS = 8
PARTITION = 3


def run(calls: int) -> dict[str, float | int]:
    keys = [k for k in (b"key-%d" % i for i in range(RECORDS * PARTITIONS * 4))
            if partition_for_key(k, PARTITIONS) == PARTITION][:RECORDS]
    batch = rb.encode_batch([(1_000, k, b"x" * 100, None) for k in keys])
    start = time.perf_counter()
    for _ in range(calls):
        check_keys_placed("t", PARTITION, batch, PARTITIONS)
    per_call_s = (time.perf_counter() - start) / calls
    return {"records_per_batch": len(keys), "batch_bytes": len(batch), "ms_per_batch": round(per_call_s * 1000, 2),
            "records_per_s_one_core": round(len(keys) / per_call_s)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.key_check", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    print(json.dumps(run(parser.parse_args().calls)))


if __name__ == "__main__":
    main()
