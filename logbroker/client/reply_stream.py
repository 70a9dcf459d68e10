"""A requester's reply stream: one record-transport connection on which a broker pushes the replies
addressed to it (frame layout in logbroker/wire.py, API_REPLY_STREAM; routing on the broker in
server/reply_registry.py).

    ReplyStream(target) ──API_REPLY_STREAM──> broker
                        <──first frame: ReplyRequest(reply_to="<broker_id>:<token>")
                        <──one frame per reply (a ReplyRequest) ──> on_replies([reply, ...]), on the reader thread

The reader thread reads what the socket has (recv_into one buffer, READ_BUFFER_BYTES, grown for a
bigger frame up to FRAME_BYTES_MAX), cuts every whole frame in it and calls `on_replies` once with
their replies, in order (the broker writes a burst of replies in one write: one wake-up, one call);
`on_closed(reason)` once when the connection ends (EOF, reset, a frame out of bounds, `close()`); a
closed stream is not reopened here (the requester opens a new one, with a new address).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from google.protobuf.message import DecodeError

from logbroker import wire
from logbroker.errors import BrokerUnavailableError
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

FRAME_BYTES_MAX = 64 << 20
READ_BUFFER_BYTES = 256 << 10


class ReplyStream:
    def __init__(self, target: tuple[str, int], on_replies: Callable[[list[pb.ReplyRequest]], None],
                 on_closed: Callable[[ReplyStream, str], None], connect_timeout_s: float) -> None:
        self._on_replies = on_replies
        self._on_closed = on_closed
        self.where = f"{target[0]}:{target[1]}"
        self.closed = False
        self._lock = threading.Lock()
        self._buf = bytearray(READ_BUFFER_BYTES)
        self._have = 0  # bytes of _buf read and not yet cut into frames
        try:
            self._sock = socket.create_connection(target, timeout=connect_timeout_s)
        except OSError as e:
            raise BrokerUnavailableError(f"cannot open a reply stream to {self.where}: {e}") from None
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._sock.sendall(wire.request_header(wire.API_REPLY_STREAM, 0, 0))
            frames: list[tuple[int, bytes]] = []
            while not frames:
                frames = self._read_frames()
            status, body = frames[0]
            if status != wire.STATUS_OK:
                raise BrokerUnavailableError(f"{self.where} refused a reply stream: {wire.status_code(status).name}: "
                                             f"{body.decode('utf-8', 'replace')}")
            self.reply_to = pb.ReplyRequest.FromString(body).reply_to
            self._sock.settimeout(None)
        except (OSError, EOFError, DecodeError) as e:
            self._sock.close()
            raise BrokerUnavailableError(f"opening a reply stream to {self.where} failed: {e}") from None
        except BaseException:
            self._sock.close()
            raise
        self._reader = threading.Thread(target=self._read, name="logbroker-reply-stream", daemon=True)
        self._reader.start()

    def _read_frames(self) -> list[tuple[int, bytes]]:
        """One recv, then every whole frame in the buffer as (status, body); the rest is kept."""
        buf, have = self._buf, self._have
        if have == len(buf):  # a frame bigger than the buffer: grow it to hold the frame (bounded)
            size = wire.RESPONSE_HEADER.unpack_from(buf, 0)[0]
            grown = bytearray(4 + size)
            grown[:have] = buf
            self._buf = buf = grown
        with memoryview(buf) as view:
            n = self._sock.recv_into(view[have:])
        if n == 0:
            raise EOFError(f"{self.where} closed the reply stream" + (" inside a frame" if have else ""))
        have += n
        frames: list[tuple[int, bytes]] = []
        pos = 0
        while have - pos >= wire.HEADER_BYTES:
            size, _corr, status = wire.RESPONSE_HEADER.unpack_from(buf, pos)
            if size < wire.SIZE_MIN or size > wire.SIZE_MIN + FRAME_BYTES_MAX:
                raise EOFError(f"{self.where} sent a frame of size {size}")
            end = pos + 4 + size
            if end > have:
                break
            frames.append((status, bytes(buf[pos + wire.HEADER_BYTES : end])))
            pos = end
        if pos:
            buf[: have - pos] = buf[pos:have]
            have -= pos
            if len(buf) > READ_BUFFER_BYTES and have <= READ_BUFFER_BYTES:  # the big frame is done: shrink
                self._buf = bytearray(READ_BUFFER_BYTES)
                self._buf[:have] = buf[:have]
        self._have = have
        return frames

    def _read(self) -> None:
        reason = "closed"
        try:
            while True:
                replies: list[pb.ReplyRequest] = []
                for status, body in self._read_frames():
                    if status != wire.STATUS_OK:
                        reason = f"{wire.status_code(status).name}: {body.decode('utf-8', 'replace')}"
                        break
                    replies.append(pb.ReplyRequest.FromString(body))
                else:
                    if replies:
                        self._on_replies(replies)
                    continue
                if replies:
                    self._on_replies(replies)
                break
        except (OSError, EOFError, ValueError, DecodeError) as e:
            reason = str(e) or type(e).__name__
        except Exception as e:  # a bug in on_replies: end loudly rather than drop replies silently
            log.exception("reply stream reader failed")
            reason = repr(e)
        self._end(reason)

    def _end(self, reason: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._on_closed(self, reason)

    def close(self) -> None:
        """End the stream (the reader thread then ends; on_closed is called once)."""
        self._end("closed by the client")
        self._reader.join(timeout=5)
        self._sock.close()
