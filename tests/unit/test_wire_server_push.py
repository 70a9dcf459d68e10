"""A reply stream's pushes (logbroker/server/wire_server.py): the replies pushed in one loop iteration
leave in one write, in order, and the push bound counts the replies queued but not yet written."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from logbroker import wire
from logbroker.server import wire_server
from logbroker.server.wire_server import _Connection


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered


def push_connection() -> tuple[_Connection, FakeTransport]:
    conn = _Connection(SimpleNamespace(sasl=None))  # type: ignore[arg-type]
    transport = FakeTransport()
    conn._transport = transport  # type: ignore[assignment]
    conn._push_token, conn._push_corr = "t", 7
    return conn, transport


def frame(body: bytes) -> bytes:
    return wire.response_header(7, wire.STATUS_OK, len(body)) + body


def test_the_replies_pushed_in_one_loop_iteration_go_out_in_one_write_in_order() -> None:
    async def main() -> list[bytes]:
        conn, transport = push_connection()
        assert conn.push(b"one") and conn.push(b"two") and conn.push(b"three")
        assert transport.writes == []  # queued: written at the start of the next iteration
        await asyncio.sleep(0)
        assert conn.push(b"four")
        await asyncio.sleep(0)
        return transport.writes

    assert asyncio.run(main()) == [frame(b"one") + frame(b"two") + frame(b"three"), frame(b"four")]


def test_the_push_bound_counts_replies_queued_but_not_written() -> None:
    async def main() -> tuple[bool, bool, int]:
        conn, transport = push_connection()
        transport.buffered = wire_server.PUSH_BUFFER_BYTES_MAX - 10
        first = conn.push(b"x" * 5)  # under the bound
        second = conn.push(b"y" * 5)  # the first one's queued frame puts it over
        await asyncio.sleep(0)
        return first, second, len(transport.writes)

    assert asyncio.run(main()) == (True, False, 1)


def test_flush_writes_the_queued_pushes_at_once() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        conn, transport = push_connection()
        conn.push(b"one")
        conn.push(b"two")
        conn.flush()  # a ReplyBatch delivered: no wait for the next iteration
        now = list(transport.writes)
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        return now, transport.writes

    now, later = asyncio.run(main())
    assert now == later == [frame(b"one") + frame(b"two")]
