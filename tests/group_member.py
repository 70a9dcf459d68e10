"""A consumer-group member as its own process, for tests that kill -9 or SIGSTOP members.

    python -m tests.group_member --bootstrap B --group G --topic T --events FILE [--session-timeout-ms N]

Every event is one JSON line, written and flushed before the next step (a kill -9 loses nothing that
happened before it): assign / revoke (with `t`, the system-wide CLOCK_MONOTONIC, comparable across
processes), rec (topic, partition, offset), commit (the offsets acknowledged), commit_error.
The member commits synchronously after every poll that returned records, so "the last commit" of a
member is exact. SIGTERM closes the consumer (commit and leave) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any, TextIO

import grpc

from logbroker.client import Consumer
from logbroker.errors import LogbrokerError
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--topic", action="append", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--session-timeout-ms", type=int, default=3000)
    ap.add_argument("--assignor", default="sticky")
    ap.add_argument("--zombie-commit-on-cont", action="store_true",
                    help="after SIGCONT, first re-send the last commit with the member id and epoch it had")
    args = ap.parse_args(argv)
    out: TextIO = open(args.events, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def emit(ev: str, **fields: Any) -> None:
        out.write(json.dumps({"ev": ev, "t": time.monotonic(), **fields}) + "\n")
        out.flush()

    def tps(parts: set[tuple[str, int]]) -> list[list[Any]]:
        return [[t, p] for t, p in sorted(parts)]

    stopping = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    resumed = False

    def on_cont(_sig: int, _frame: object) -> None:
        nonlocal resumed
        resumed = True

    signal.signal(signal.SIGTERM, on_term)
    if args.zombie_commit_on_cont:
        signal.signal(signal.SIGCONT, on_cont)
    last_commit: tuple[str, int, dict[tuple[str, int], int]] | None = None
    consumer = Consumer(
        args.bootstrap, topics=args.topic, group=args.group, enable_auto_commit=False,
        session_timeout_ms=args.session_timeout_ms, assignor=args.assignor,
        on_assign=lambda parts: emit("assign", tps=tps(parts)),
        on_revoke=lambda parts: emit("revoke", tps=tps(parts)),
    )
    emit("start")
    try:
        while not stopping:
            if resumed and last_commit is not None:
                resumed = False
                code = _raw_commit(args.bootstrap, args.group, *last_commit)
                emit("zombie_commit", member_id=last_commit[0], member_epoch=last_commit[1], code=code)
            records = consumer.poll(timeout_ms=200)
            if not records:
                continue
            for m in records:
                emit("rec", tp=[m.topic, m.partition], o=m.offset)
            offsets = {}
            for m in records:
                offsets[(m.topic, m.partition)] = m.offset + 1
            try:
                member = (consumer.member_id, consumer.member_epoch)
                consumer.commit(offsets)
                last_commit = (*member, offsets)
                emit("commit", offsets=[[t, p, o] for (t, p), o in sorted(offsets.items())],
                     member_id=member[0], member_epoch=member[1])
            except LogbrokerError as e:
                emit("commit_error", error=str(e), offsets=[[t, p, o] for (t, p), o in sorted(offsets.items())])
    finally:
        consumer.close()
        emit("closed")
    return 0


def _raw_commit(bootstrap: str, group: str, member_id: str, member_epoch: int,
                offsets: dict[tuple[str, int], int]) -> str:
    """OffsetCommit straight to the coordinator, as a zombie would send it; returns the error code name."""
    for address in bootstrap.split(","):
        try:
            found = pbg.BrokerStub(grpc.insecure_channel(address)).FindCoordinator(
                pb.FindCoordinatorRequest(group=group), timeout=5)
            if found.error_code != pb.NONE:
                continue
            r = pbg.BrokerStub(grpc.insecure_channel(f"{found.host}:{found.port}")).OffsetCommit(
                pb.OffsetCommitRequest(group=group, member_id=member_id, member_epoch=member_epoch, partitions=[
                    pb.OffsetCommitPartition(topic=t, partition=p, offset=o) for (t, p), o in offsets.items()]),
                timeout=5)
            return pb.ErrorCode.Name(r.error_code)
        except grpc.RpcError:
            continue
    return "UNREACHABLE"


if __name__ == "__main__":
    sys.exit(main())
