"""Server-side record filters: a CEL expression (Common Expression Language, via `cel-python`)
over one record's key, headers and timestamp. Pure: no I/O; the broker's fetch path and the
clients (which check an expression before sending it) both use `compile_filter`.

Variables::

    key        string   the record key, UTF-8 decoded with replacement; "" when it has none
    headers    map      string -> string, each value UTF-8 decoded with replacement ("" for a
                        null value); a header name given twice: the last one wins
    timestamp  int      the record's timestamp, ms since the epoch

A filter matches a record when it evaluates to `true`. Anything else is no match: `false`, a
value that is not a bool, or an evaluation error. A missing header is an evaluation error in CEL
(`headers["type"]` with no "type" header), so `headers["type"] == "invoice"` does not match a
record without that header, and `!(headers["type"] == "invoice")` does not match it either; write
`"type" in headers && headers["type"] == "invoice"` (or `!("type" in headers) || ...`) to say what
a missing header means. `&&` and `||` are commutative over errors in CEL: `false && error` is
false, `true || error` is true.

`compile_filter` refuses (`InvalidFilterError`, ErrorCode INVALID_FILTER) an expression that:

- is longer than `MAX_FILTER_CHARS` (1,024) characters, or empty;
- does not parse: the message is the parser's (lark's first line, and the expression with a caret
  under the column);
- nests deeper than `MAX_TREE_DEPTH` parse-tree levels (deep nesting would exhaust the
  evaluator's recursion), or fails its trial evaluation against an empty record with anything but
  an ordinary evaluation error;
- names a variable other than key, headers and timestamp;
- calls a function or macro not on the allow-list. Allowed, all linear in their input:
  `size`, `int`, `uint`, `double`, `string`, `bool`, `has` (a field test: `has(headers.type)`) as
  functions; `startsWith`, `endsWith`, `contains`, `size` as methods. Operators (`== != < <= > >=
  in && || ! ?: + - * / %`, indexing, list and map literals) are always allowed. Refused: `matches`
  (regular expressions: Python's backtracking engine has no cost bound), the comprehension macros
  (`all`, `exists`, `exists_one`, `map`, `filter`: nested, they are polynomial in the header count),
  `timestamp`/`duration` and every other function, message construction `T{...}` and
  leading-dot names. With no loops and a bounded length, evaluating one record costs at most a
  bounded number of steps, each linear in the record's size.

Cost: cel-python parses and checks the expression; evaluation is by the expression translated
once into a Python function (filter_program.py: ~1 µs per record instead of cel-python's
~110 µs), or, for what that module does not translate, by cel-python itself (`matches_celpy`,
the reference the translation is tested against). The broker bounds how many bytes one filtered
fetch decodes (server/apis/fetch_filter.py).

Importing this module raises the interpreter's recursion limit to 2,500 (cel-python's
Environment does it, for CEL's nesting minimums) and quiets the `celpy` loggers (which log an
ERROR line for every evaluation error, e.g. a missing header).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import celpy
import lark
from celpy import celtypes

from logbroker.errors import InvalidFilterError
from logbroker.group.filter_program import FilterProgram, translate

MAX_FILTER_CHARS = 1024
MAX_TREE_DEPTH = 400
VARIABLES = frozenset({"key", "headers", "timestamp"})
ALLOWED_FUNCTIONS = frozenset({"size", "int", "uint", "double", "string", "bool", "has"})
ALLOWED_METHODS = frozenset({"startsWith", "endsWith", "contains", "size"})

logging.getLogger("celpy").setLevel(logging.CRITICAL)
_ENV = celpy.Environment(runner_class=celpy.CompiledRunner)
_EMPTY_ACTIVATION: dict[str, Any] = {
    "key": celtypes.StringType(""),
    "headers": celtypes.MapType({}),
    "timestamp": celtypes.IntType(0),
}


def _parse_message(exc: celpy.CELParseError) -> str:
    """The parser's own words: lark's first line (what it met, where) and the caret context."""
    context = str(exc.args[0]).rstrip() if exc.args else ""
    cause = exc.__context__
    lines = str(cause).splitlines() if cause is not None else []
    detail = lines[0] if lines else f"syntax error at line {exc.line}, column {exc.column}"
    return f"{detail}\n{context}"


def _tree_depth(tree: lark.Tree) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, lark.Tree))
    return deepest


def _name(node: lark.Tree, index: int) -> str:
    child = node.children[index]
    return str(child) if isinstance(child, lark.Token) else "?"


def _check_names(tree: lark.Tree) -> None:
    """Refuse what is not on the allow-list (module doc)."""
    for node in tree.iter_subtrees_topdown():
        kind = node.data
        if kind == "ident_arg" and _name(node, 0) not in ALLOWED_FUNCTIONS:
            raise InvalidFilterError(f"function {_name(node, 0)}() is not allowed in a filter; allowed: "
                                     f"{', '.join(sorted(ALLOWED_FUNCTIONS))}")
        if kind == "member_dot_arg" and _name(node, 1) not in ALLOWED_METHODS:
            raise InvalidFilterError(f"method .{_name(node, 1)}() is not allowed in a filter; allowed: "
                                     f"{', '.join(sorted(ALLOWED_METHODS))}")
        if kind in ("dot_ident_arg", "dot_ident", "member_object"):
            raise InvalidFilterError(f"{kind} is not allowed in a filter (no leading-dot names or message construction)")
        if kind == "ident" and _name(node, 0) not in VARIABLES:
            raise InvalidFilterError(f"unknown variable {_name(node, 0)!r}; a filter sees key, headers and timestamp")


@dataclass(frozen=True)
class RecordFilter:
    """A compiled filter: compile once (`compile_filter`), then `matches` per record. `fast` is the
    expression translated to Python (filter_program.py), None when cel-python evaluates it."""

    expression: str
    _program: Any
    fast: FilterProgram | None = None

    def matches(self, key: bytes | None, headers: Iterable[tuple[str, bytes | None]], timestamp: int) -> bool:
        fast = self.fast
        if fast is not None:
            uses = fast.uses
            return fast.function(
                (key.decode("utf-8", "replace") if key else "") if "key" in uses else "",
                {k: v.decode("utf-8", "replace") if v else "" for k, v in headers} if "headers" in uses else {},
                timestamp,
            ) is True
        return self.matches_celpy(key, headers, timestamp)

    def matches_celpy(self, key: bytes | None, headers: Iterable[tuple[str, bytes | None]], timestamp: int) -> bool:
        """The reference: cel-python's evaluation of the expression."""
        activation = {
            "key": celtypes.StringType(key.decode("utf-8", "replace") if key else ""),
            "headers": celtypes.MapType({
                celtypes.StringType(k): celtypes.StringType(v.decode("utf-8", "replace") if v else "")
                for k, v in headers
            }),
            "timestamp": celtypes.IntType(timestamp),
        }
        try:
            result = self._program.evaluate(activation)
        except Exception:  # an evaluation error (missing header, overflow, ...): no match
            return False
        return result is True or (isinstance(result, celtypes.BoolType) and bool(result))


def compile_filter(expression: str) -> RecordFilter:
    """The compiled filter, or InvalidFilterError saying why not (module doc)."""
    if not expression.strip():
        raise InvalidFilterError("a filter expression must not be empty")
    if len(expression) > MAX_FILTER_CHARS:
        raise InvalidFilterError(f"filter expression is {len(expression)} characters; the limit is {MAX_FILTER_CHARS}")
    try:
        tree = _ENV.compile(expression)
    except celpy.CELParseError as exc:
        raise InvalidFilterError(f"filter does not parse: {_parse_message(exc)}") from None
    except RecursionError:
        raise InvalidFilterError(f"filter nests too deeply (limit {MAX_TREE_DEPTH} parse-tree levels)") from None
    if _tree_depth(tree) > MAX_TREE_DEPTH:
        raise InvalidFilterError(f"filter nests too deeply (limit {MAX_TREE_DEPTH} parse-tree levels)")
    _check_names(tree)
    try:
        program = _ENV.program(tree)
        program.evaluate(dict(_EMPTY_ACTIVATION))  # a trial run: recursion and transpiler faults show here
    except celpy.CELEvalError:
        pass  # e.g. a missing header in the empty record: ordinary
    except Exception as exc:
        raise InvalidFilterError(f"filter cannot be evaluated: {type(exc).__name__}: {exc}") from None
    return RecordFilter(expression, program, translate(tree))
