"""record_filter: CEL filters compiled once, refused with the parser's message, bounded."""

from __future__ import annotations

import pytest

from logbroker.errors import InvalidFilterError
from logbroker.group.record_filter import MAX_FILTER_CHARS, compile_filter
from logbroker.v1 import logbroker_pb2 as pb

TYPICAL = 'headers["type"] == "invoice" && key.startsWith("eu-")'


def test_typical_expression() -> None:
    f = compile_filter(TYPICAL)
    assert f.matches(b"eu-1", [("type", b"invoice")], 1)
    assert not f.matches(b"us-1", [("type", b"invoice")], 1)
    assert not f.matches(b"eu-1", [("type", b"receipt")], 1)
    assert not f.matches(None, [("type", b"invoice")], 1)


def test_compiled_once_reused_for_many_records() -> None:
    f = compile_filter('timestamp >= 10 && size(key) == 2 && has(headers.type)')
    results = [f.matches(b"ab", [("type", b"x")], ts) for ts in range(20)]
    assert results == [ts >= 10 for ts in range(20)]


def test_missing_header_is_no_match_even_negated() -> None:
    f = compile_filter('headers["type"] == "invoice"')
    assert not f.matches(b"k", [], 0)
    assert not compile_filter('!(headers["type"] == "invoice")').matches(b"k", [], 0)
    guarded = compile_filter('"type" in headers && headers["type"] == "invoice"')
    assert not guarded.matches(b"k", [], 0)
    assert guarded.matches(b"k", [("type", b"invoice")], 0)
    assert compile_filter('!("type" in headers) || headers["type"] == "x"').matches(b"k", [], 0)


def test_key_and_headers_decoded_with_replacement() -> None:
    assert compile_filter('key == ""').matches(None, [], 0)
    assert compile_filter('key.endsWith("\\uFFFD")').matches(b"a\xff", [], 0)
    assert compile_filter('headers["h"] == ""').matches(b"", [("h", None)], 0)
    assert compile_filter('headers["h"] == "2"').matches(b"", [("h", b"1"), ("h", b"2")], 0)


def test_non_bool_result_is_no_match() -> None:
    assert not compile_filter("key").matches(b"x", [], 0)
    assert not compile_filter("timestamp").matches(b"x", [], 5)


@pytest.mark.parametrize("expr, column", [("headers[", 8), ("key ==", 5), ("1 +* 2", 4)])
def test_parse_error_carries_parser_message(expr: str, column: int) -> None:
    with pytest.raises(InvalidFilterError) as info:
        compile_filter(expr)
    assert info.value.code == pb.INVALID_FILTER
    assert "does not parse" in info.value.message
    assert f"line 1, column {column}" in info.value.message  # lark's own words
    assert expr in info.value.message and "^" in info.value.message


def test_length_bound() -> None:
    ok = 'key == "' + "a" * (MAX_FILTER_CHARS - 9) + '"'
    assert len(ok) == MAX_FILTER_CHARS
    compile_filter(ok)
    with pytest.raises(InvalidFilterError, match="1025 characters; the limit is 1024"):
        compile_filter(ok + " ")


@pytest.mark.parametrize("expr, name", [
    ('key.matches("(a+)+$")', "matches"),
    ('headers.exists(k, k == "a")', "exists"),
    ('headers.all(k, k == "a")', "all"),
    ('[1, 2].map(x, x * 2) == [2, 4]', "map"),
    ("timestamp(key) > 1", "timestamp"),
    ('duration("1s") > 1', "duration"),
])
def test_forbidden_functions(expr: str, name: str) -> None:
    with pytest.raises(InvalidFilterError, match=f"{name}\\(\\) is not allowed"):
        compile_filter(expr)


@pytest.mark.parametrize("expr", ["foo == 1", "", "   ", ".foo(1)"])
def test_unknown_names_and_empty_refused(expr: str) -> None:
    with pytest.raises(InvalidFilterError):
        compile_filter(expr)


@pytest.mark.parametrize("expr", [
    "(" * 300 + "true" + ")" * 300,
    "+".join(["1"] * 300) + " > 0",
    "!" * 500 + "true",
])
def test_deep_nesting_refused_not_crashing(expr: str) -> None:
    with pytest.raises(InvalidFilterError, match="nests too deeply"):
        compile_filter(expr)
