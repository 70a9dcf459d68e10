"""logbroker/wire.py: the record transport's frame headers and status numbers."""

from __future__ import annotations

import grpc
import pytest

from logbroker import wire


def test_request_header_layout():
    head = wire.request_header(wire.API_FETCH, 0x01020304, 7)
    assert len(head) == wire.HEADER_BYTES == 9
    # size counts api + corr + body; big-endian
    assert head == (12).to_bytes(4, "big") + bytes([wire.API_FETCH]) + bytes([1, 2, 3, 4])
    assert wire.REQUEST_HEADER.unpack(head) == (wire.SIZE_MIN + 7, wire.API_FETCH, 0x01020304)


def test_response_header_layout():
    head = wire.response_header(0xDEADBEEF, 3, 0)
    assert len(head) == wire.HEADER_BYTES
    assert head == (5).to_bytes(4, "big") + (0xDEADBEEF).to_bytes(4, "big") + b"\x03"
    assert wire.RESPONSE_HEADER.unpack(wire.response_header(5, wire.STATUS_OK, 100)) == (105, 5, 0)


def test_correlation_ids_wrap_at_32_bits():
    assert wire.REQUEST_HEADER.unpack(wire.request_header(wire.API_PRODUCE, (1 << 32) + 5, 0))[2] == 5
    assert wire.RESPONSE_HEADER.unpack(wire.response_header(-1, 0, 0))[1] == 0xFFFFFFFF


def test_api_numbers_are_the_documented_ones():
    assert (wire.API_PRODUCE, wire.API_FETCH) == (1, 2)


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_status_number_round_trips_every_grpc_code(code: grpc.StatusCode):
    number = wire.status_number(code)
    assert 0 <= number <= 255  # fits the status byte
    assert wire.status_code(number) is code


def test_status_numbers_are_grpcs_wire_numbers():
    assert wire.status_number(grpc.StatusCode.OK) == wire.STATUS_OK == 0
    assert wire.status_number(grpc.StatusCode.INVALID_ARGUMENT) == 3
    assert wire.status_number(grpc.StatusCode.DEADLINE_EXCEEDED) == 4
    assert wire.status_number(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
    assert wire.status_number(grpc.StatusCode.UNIMPLEMENTED) == 12
    assert wire.status_number(grpc.StatusCode.INTERNAL) == 13
    assert wire.status_number(grpc.StatusCode.UNAVAILABLE) == 14


@pytest.mark.parametrize("number", [17, 99, 255])
def test_an_unknown_status_number_is_unknown(number: int):
    assert wire.status_code(number) is grpc.StatusCode.UNKNOWN


def test_error_frame_layout():
    frame = wire.error_frame(42, grpc.StatusCode.NOT_FOUND, "no such thing é")
    body = "no such thing é".encode()
    size, corr, status = wire.RESPONSE_HEADER.unpack_from(frame)
    assert (size, corr, status) == (wire.SIZE_MIN + len(body), 42, 5)
    assert frame[wire.HEADER_BYTES:] == body
    assert len(frame) == 4 + size


def test_error_frame_message_is_truncated_to_4096_bytes():
    frame = wire.error_frame(1, grpc.StatusCode.INTERNAL, "x" * 10_000)
    size, corr, status = wire.RESPONSE_HEADER.unpack_from(frame)
    assert size == wire.SIZE_MIN + 4096 and len(frame) == wire.HEADER_BYTES + 4096
    assert (corr, status) == (1, 13)
    # multi-byte characters may be cut mid-character: the header still counts the bytes sent
    cut = wire.error_frame(1, grpc.StatusCode.INTERNAL, "é" * 3000)
    assert wire.RESPONSE_HEADER.unpack_from(cut)[0] == wire.SIZE_MIN + 4096
    assert cut[wire.HEADER_BYTES:].decode("utf-8", "replace").startswith("é" * 2048)
