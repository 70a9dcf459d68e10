"""`logbroker dump-log`: the batches of one partition replica, as Kafka's `kafka-dump-log.sh`.

Two sources, one output::

    logbroker dump-log DIR                               offline: every segment file of a partition
                                                         directory (<data dir>/<topic>-<partition>)
    logbroker dump-log --broker HOST:PORT TOPIC PARTITION
                                                         one broker's own copy (Admin/ReadReplica),
                                                         leader or follower, up to its log end offset

One line per batch (text), or one JSON object per line (`--format json`)::

    baseOffset: 0 lastOffset: 2 count: 3 leaderEpoch: 0 producerId: -1 size: 173 position: 0 crc: ok

`crc: BAD (why)` marks a batch that fails the scrubber's checks (replication/scrubber.py: length, magic,
baseOffset continuity, CRC-32C); a bad length ends the segment's walk. `--records` decodes the
records of good batches. Offline, the exit status is 1 if any batch is BAD. Through a broker, the
batches at or above that replica's high watermark are marked `unreplicated?`: they may not be on
the other replicas and may yet be truncated. Kept apart from cli.py, which registers it with
`add_dump_log_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from logbroker.errors import LogbrokerError
from logbroker.replication.scrubber import BatchCheck, walk_segment
from logbroker.storage import segment as segment_file
from logbroker.storage.record_batch import decode_batch, parse_header

EXIT_OK = 0
EXIT_BAD = 1
BROKER_MAX_BYTES_DEFAULT = 1 << 20


class DumpLogError(LogbrokerError):
    """A usage problem (printed as one line by cli.main, exit 1)."""


def add_dump_log_parser(sub: Any) -> None:
    d = sub.add_parser(
        "dump-log", help="print the batches of a partition replica (offline from its directory, or via --broker)",
        description="Print each batch: offsets, record count, leader epoch, producer id, size, position and "
        "CRC status. DIR is a partition directory (<data-dir>/<topic>-<partition>); no broker is needed. "
        "With --broker HOST:PORT TOPIC PARTITION, that broker's own copy is read, whether it leads or "
        "follows, up to its log end offset.")
    d.add_argument("target", nargs="+", metavar="DIR | TOPIC PARTITION")
    d.add_argument("--broker", metavar="HOST:PORT", help="read this broker's local copy of TOPIC PARTITION")
    d.add_argument("--offset", type=int, default=-1, help="with --broker: first offset (default: log start)")
    d.add_argument("--max-bytes", type=int, default=BROKER_MAX_BYTES_DEFAULT,
                   help="with --broker: bytes to read (at least one batch; the broker caps it at 16 MiB)")
    d.add_argument("--records", action="store_true", help="also decode the records of each good batch")
    d.add_argument("--format", choices=["text", "json"], default="text")
    d.set_defaults(func=cmd_dump_log)


def cmd_dump_log(args: argparse.Namespace) -> int:
    if args.broker:
        if len(args.target) != 2:
            raise DumpLogError("with --broker, give TOPIC PARTITION")
        return _dump_broker(args)
    if len(args.target) != 1:
        raise DumpLogError("give one partition directory (or --broker HOST:PORT TOPIC PARTITION)")
    return _dump_dir(Path(args.target[0]), args)


def segment_checks(path: Path) -> Iterator[tuple[BatchCheck, Callable[[int, int], bytes]]]:
    """Every batch of one segment file, with a reader of the file's bytes (whole file in memory:
    an offline tool, and segments are bounded by segment_bytes)."""
    base = segment_file.parse_file_name(path.name)
    if base is None:
        raise DumpLogError(f"{path} is not a segment file")
    data = path.read_bytes()

    def read(pos: int, n: int) -> bytes:
        return data[pos : pos + n]

    for check in walk_segment(read, len(data), base):
        yield check, read


def _dump_dir(directory: Path, args: argparse.Namespace) -> int:
    if not directory.is_dir():
        raise DumpLogError(f"{directory} is not a directory")
    segments = sorted(p for p in directory.iterdir() if segment_file.parse_file_name(p.name) is not None)
    if not segments:
        raise DumpLogError(f"no segment files (*.log named by base offset) in {directory}")
    bad = 0
    try:
        for path in segments:
            if args.format == "text":
                print(f"segment {path.name} ({path.stat().st_size} bytes)")
            for check, read in segment_checks(path):
                bad += not check.ok
                _emit(check, read, args, {"segment": path.name})
    except OSError as e:
        raise DumpLogError(f"cannot read {directory}: {e.strerror or e}") from None
    if bad:
        print(f"logbroker: {bad} bad batches in {directory}", file=sys.stderr)
        return EXIT_BAD
    return EXIT_OK


def _dump_broker(args: argparse.Namespace) -> int:
    import grpc

    from logbroker.errors import error_for
    from logbroker.v1 import logbroker_pb2 as pb
    from logbroker.v1 import logbroker_pb2_grpc as pbg

    topic, partition_text = args.target
    try:
        partition = int(partition_text)
    except ValueError:
        raise DumpLogError(f"PARTITION must be an integer, got {partition_text!r}") from None
    req = pb.ReadReplicaRequest(topic=topic, partition=partition, offset=args.offset, max_bytes=args.max_bytes)
    with grpc.insecure_channel(args.broker, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        resp = pbg.AdminStub(ch).ReadReplica(req, timeout=30)
    if resp.error_code != pb.NONE:
        raise error_for(resp.error_code, resp.error_message)
    header = {"broker_id": resp.broker_id, "role": resp.role, "leader_epoch": resp.leader_epoch,
              "log_start_offset": resp.log_start_offset, "log_end_offset": resp.log_end_offset,
              "high_watermark": resp.high_watermark}
    if args.format == "text":
        print(f"broker {resp.broker_id} ({resp.role}, leader epoch {resp.leader_epoch}): log start "
              f"{resp.log_start_offset}, log end {resp.log_end_offset}, high watermark {resp.high_watermark}; "
              "batches at or above the high watermark may be unreplicated")
    else:
        print(json.dumps({"replica": header}))
    data = bytes(resp.records)
    base = parse_header(data, 0).base_offset if len(data) >= 8 else 0

    def read(pos: int, n: int) -> bytes:
        return data[pos : pos + n]

    bad = 0
    for check in walk_segment(read, len(data), base):
        bad += not check.ok
        _emit(check, read, args, {"unreplicated": check.offset >= resp.high_watermark})
    return EXIT_BAD if bad else EXIT_OK


def _emit(check: BatchCheck, read: Callable[[int, int], bytes], args: argparse.Namespace,
          extra: dict[str, Any]) -> None:
    records = _records(check, read) if args.records and check.ok else []
    if args.format == "json":
        out = {**extra, "base_offset": check.offset, "last_offset": check.last_offset,
               "count": check.record_count, "leader_epoch": check.leader_epoch, "producer_id": check.producer_id,
               "producer_epoch": check.producer_epoch, "base_sequence": check.base_sequence,
               "max_timestamp": check.max_timestamp, "size": check.size_bytes, "position": check.position,
               "crc": "ok" if check.ok else "BAD", "problem": check.problem}
        if args.records:
            out["records"] = records
        print(json.dumps(out))
        return
    status = "ok" if check.ok else f"BAD ({check.problem})"
    flag = " unreplicated?" if extra.get("unreplicated") else ""
    print(f"baseOffset: {check.offset} lastOffset: {check.last_offset} count: {check.record_count} "
          f"leaderEpoch: {check.leader_epoch} producerId: {check.producer_id} size: {check.size_bytes} "
          f"position: {check.position} crc: {status}{flag}")
    for r in records:
        print(f"| offset: {r['offset']} timestamp: {r['timestamp']} key: {r['key']} value: {r['value']}"
              + (f" headers: {r['headers']}" if r["headers"] else ""))


def _records(check: BatchCheck, read: Callable[[int, int], bytes]) -> list[dict[str, Any]]:
    data = read(check.position, check.size_bytes)
    try:
        messages = decode_batch(data, 0, parse_header(data, 0), "", 0)
    except LogbrokerError as e:
        return [{"offset": check.offset, "timestamp": -1, "key": None, "value": None, "headers": [],
                 "error": str(e)}]
    return [{"offset": m.offset, "timestamp": m.timestamp, "key": _text(m.key), "value": _text(m.value),
             "headers": [[k, _text(v)] for k, v in m.headers]} for m in messages]


def _text(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.hex()
