"""filter_program: the CEL filter translated to Python evaluates as cel-python does (the reference),
error values included, over generated records and generated expressions."""

from __future__ import annotations

from typing import Any

import celpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logbroker.group.filter_program import ERR
from logbroker.group.record_filter import compile_filter

# every translated operator, function and method; errors of each kind (missing header, wrong-type
# comparison, int64 overflow, division by zero) and how && || ! ?: treat them
EXPRESSIONS = [
    'headers["type"] == "invoice" && key.startsWith("eu-")',
    'headers.type != "invoice" || key.endsWith("-1")',
    '!(headers["type"] == "invoice")',
    'has(headers.type)',
    '"type" in headers ? headers.type : key',
    'key.contains("u-") && size(key) > 2 && key.size() <= 6',
    'size(headers) >= 1',
    'key < "m" || key >= "x"',
    'key + "!" == "eu-1!"',
    'key in ["eu-1", "us-2", ""]',
    'timestamp in [0, 1, 9223372036854775807]',
    'timestamp > 100 && timestamp < 1000',
    'timestamp >= -5 && timestamp <= 5',
    'timestamp + 1 > timestamp',
    'timestamp - 1 < timestamp',
    'timestamp * 2 == timestamp + timestamp',
    'timestamp / 3 == -timestamp / -3',
    'timestamp % 7 == 3',
    '-timestamp < 0',
    '100 / (timestamp - timestamp) == 1 || true',
    'false && 1 / 0 == 1',
    '1 / 0 == 1 && false',
    'true || headers.missing == "x"',
    '(1 % 0 == 0) ? true : false',
    'timestamp == "x" || key == "eu-1"',
    'key + 1 == "x" || headers.n == "1"',
    'string(timestamp) == headers.n',
    'int(timestamp) == timestamp && string(key) == key && bool(true)',
    '(headers.type == "invoice") == (key == "eu-1")',
    'true != false && !(false)',
    'headers[key] == "invoice"',
    'timestamp * 9223372036854775807 > 0 || !(timestamp > 1)',
    'key == 0x10 || -9223372036854775808 < timestamp',
    '"""tri""" + \'single\' + r"\\d" + "\\u00e9" == key',
]

keys = st.one_of(st.none(), st.sampled_from([b"eu-1", b"us-2", b"", b"x", b"eu-\xff", b"zz-1"]),
                 st.binary(max_size=6))
header_names = st.sampled_from(["type", "region", "n", "eu-1", "x"])
header_values = st.one_of(st.none(), st.sampled_from([b"invoice", b"receipt", b"1", b"0", b""]),
                          st.binary(max_size=4))
headers = st.lists(st.tuples(header_names, header_values), max_size=4)
timestamps = st.one_of(st.sampled_from([0, 1, -1, 3, 10, 500, 2**63 - 1, -(2**63), 2**62]),
                       st.integers(min_value=-(2**63), max_value=2**63 - 1))
records = st.tuples(keys, headers, timestamps)


def _reference(f: Any, key: bytes | None, hdrs: list[tuple[str, bytes | None]], ts: int) -> Any:
    from celpy import celtypes
    activation = {
        "key": celtypes.StringType(key.decode("utf-8", "replace") if key else ""),
        "headers": celtypes.MapType({celtypes.StringType(k): celtypes.StringType(v.decode("utf-8", "replace") if v else "")
                                     for k, v in hdrs}),
        "timestamp": celtypes.IntType(ts),
    }
    try:
        return f._program.evaluate(activation)
    except celpy.CELEvalError:
        return ERR


def _fast(f: Any, key: bytes | None, hdrs: list[tuple[str, bytes | None]], ts: int) -> Any:
    return f.fast.function(key.decode("utf-8", "replace") if key else "",
                           {k: v.decode("utf-8", "replace") if v else "" for k, v in hdrs}, ts)


def _same(f: Any, record: tuple[bytes | None, list[tuple[str, bytes | None]], int]) -> None:
    want, got = _reference(f, *record), _fast(f, *record)
    context = f"{f.expression!r} on {record!r}: celpy {want!r}, fast {got!r}"
    assert (got is ERR) == (want is ERR), context
    if got is not ERR:
        assert got == want and isinstance(got, bool) == (want is True or want is False or
                                                          isinstance(want, celpy.celtypes.BoolType)), context
    assert f.matches(*record) == f.matches_celpy(*record), context


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_every_listed_expression_is_translated(expression: str) -> None:
    assert compile_filter(expression).fast is not None


COMPILED = [compile_filter(e) for e in EXPRESSIONS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records)
def test_fast_evaluator_agrees_with_celpy(record: tuple[bytes | None, list[tuple[str, bytes | None]], int]) -> None:
    for f in COMPILED:
        _same(f, record)


def _leaf() -> st.SearchStrategy[str]:
    return st.sampled_from(['key', 'timestamp', 'headers["type"]', 'headers.n', 'headers[key]', '"eu-1"', '"1"',
                            '""', '0', '1', '-3', '9223372036854775807', 'true', 'false', 'size(key)',
                            'has(headers.type)', '"n" in headers', 'string(timestamp)'])


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "&&", "||", "+", "-", "*", "/", "%"])
    return st.one_of(
        st.builds(lambda a, op, b: f"({a} {op} {b})", inner, binary, inner),
        st.builds(lambda a: f"!({a})", inner),
        st.builds(lambda a: f"-({a})", inner),
        st.builds(lambda c, a, b: f"({c} ? {a} : {b})", inner, inner, inner),
        st.builds(lambda a, m, b: f"({a}).{m}({b})", inner, st.sampled_from(["startsWith", "endsWith", "contains"]), inner),
        st.builds(lambda a, b, c: f"({a} in [{b}, {c}])", inner, inner, inner),
        st.builds(lambda a, fn: f"{fn}({a})", inner, st.sampled_from(["size", "int", "string", "bool"])),
    )


expressions = st.recursive(_leaf(), _extend, max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expression=expressions, batch=st.lists(records, min_size=1, max_size=5))
def test_generated_expressions_agree_with_celpy(expression: str, batch: list[Any]) -> None:
    f = compile_filter(expression)
    if f.fast is None:
        for record in batch:  # cel-python evaluates it: matches is the reference itself
            assert f.matches(*record) == f.matches_celpy(*record)
        return
    for record in batch:
        _same(f, record)


@pytest.mark.parametrize("expression", ["1 == 1.0", "1u < 2", 'b"a" == "a"', "null == null", '{"a": 1}["a"] == 1',
                                        "true == 1", "[1][0] == 1", "double(timestamp) > 1.5",
                                        "!has(headers.x)", "has(headers.x) ? true : false",
                                        "has(headers.x) && true", "has(headers.x) || has(headers.y)"])
def test_untranslated_constructs_fall_back_to_celpy(expression: str) -> None:
    f = compile_filter(expression)
    assert f.fast is None
    assert f.matches(b"k", [], 3) == f.matches_celpy(b"k", [], 3)
