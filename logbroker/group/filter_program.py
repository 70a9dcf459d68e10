"""A CEL filter's checked parse tree translated once into a Python function, so a record is
evaluated without cel-python (which costs ~100 µs per record). Pure: no I/O.

`translate(tree)` returns a `FilterProgram` whose `function(key, headers, timestamp)` takes the
record as plain Python values (`key` a str, `headers` a dict str -> str, `timestamp` an int) and
returns the expression's value, or `ERR` for a CEL evaluation error. It returns None for anything
it does not translate, and record_filter.py then evaluates with cel-python (the reference): so
correctness never depends on how much is translated, only on what is.

What is translated is typed statically (the variables' types are fixed: key string, headers
map(string, string), timestamp int), and only where the value's Python type equals its CEL type:

- literals: string (cel-python's own unescaping), int (int64, decimal or hex), bool;
- `key`, `headers`, `timestamp`; `headers[s]`, `headers.name` (ERR when missing), `has(headers.name)`
  (as the whole filter only: cel-python's `has` returns a Python bool, not a CEL bool, which its
  `!`, `?:`, `&&` and `||` treat as a non-bool, e.g. `!has(headers.x)` is an error there and
  `has(headers.a) && has(headers.b)` too; those uses are left to cel-python);
- `== != < <= > >=` on two strings, two ints or two bools; `in` on (string, headers) and on
  (T, a list literal of T); `+` on strings; `+ - * / %` and unary `-` on ints (ERR outside int64,
  ERR on division by zero; `/` truncates and `%` takes the dividend's sign, as cel-python);
- `&& || ! ?:` with CEL's error rules: `false && ERR` is false, `true || ERR` is true, `!ERR` and
  `ERR ? a : b` are ERR;
- `size`, `.size()` on strings and headers, `startsWith endsWith contains` on strings,
  `int(int)`, `string(string)`, `string(int)`, `bool(bool)`;
- an int compared with or added to a string (`timestamp == "x"`, `key + 1`): always an error in
  CEL, so the constant ERR.

Everything else (doubles, uints, bytes, null, maps, mixed-type lists, int/bool comparisons, where
cel-python has its own rules) is not translated. The generated source is one expression: a
subexpression that may be ERR is bound to a temporary (`:=`) and tested with `is ERR` before use.
tests/unit/test_filter_program.py checks it against cel-python with hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lark
from celpy.evaluation import celstr


class _Err:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ERR"


ERR: Any = _Err()
"""A CEL evaluation error, as a value."""

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
STR, INT, BOOL, HEADERS, ERRT = "string", "int", "bool", "headers", "error"
PYBOOL = "has-bool"  # has()'s result: cel-python gives a Python bool, which its ! and ?: refuse
_COMPARABLE = frozenset({STR, INT, BOOL})
_RELATIONS = {"relation_eq": "==", "relation_ne": "!=", "relation_lt": "<", "relation_le": "<=",
              "relation_gt": ">", "relation_ge": ">="}
_INT_OPS = {"addition_add": "_add", "addition_sub": "_sub", "multiplication_mul": "_mul",
            "multiplication_div": "_div", "multiplication_mod": "_mod"}


def _ck(value: int) -> Any:
    return value if _INT64_MIN <= value <= _INT64_MAX else ERR


def _add(a: int, b: int) -> Any:
    return _ck(a + b)


def _sub(a: int, b: int) -> Any:
    return _ck(a - b)


def _mul(a: int, b: int) -> Any:
    return _ck(a * b)


def _div(a: int, b: int) -> Any:
    if b == 0:
        return ERR
    quotient = abs(a) // abs(b)
    return _ck(-quotient if (a < 0) != (b < 0) else quotient)


def _mod(a: int, b: int) -> Any:
    if b == 0:
        return ERR
    rest = abs(a) % abs(b)
    return _ck(-rest if a < 0 else rest)


def _neg(a: int) -> Any:
    return _ck(-a)


_NAMESPACE: dict[str, Any] = {"ERR": ERR, "_add": _add, "_sub": _sub, "_mul": _mul, "_div": _div,
                              "_mod": _mod, "_neg": _neg}


class _Untranslated(Exception):
    """A construct this module leaves to cel-python."""


@dataclass(frozen=True)
class _Code:
    src: str
    type: str  # STR, INT, BOOL, HEADERS, ERRT (always an error) or "list:T"
    may_err: bool


_ERR_CODE = _Code("ERR", ERRT, True)


@dataclass(frozen=True)
class FilterProgram:
    """The translated filter: `function(key, headers, timestamp)` -> value or ERR; `uses` says which
    of the three it reads (so the caller decodes only those)."""

    source: str
    function: Callable[[str, dict[str, str], int], Any]
    uses: frozenset[str]


def translate(tree: lark.Tree) -> FilterProgram | None:
    """The Python function for a checked CEL parse tree (record_filter.compile_filter's), or None
    when part of it is not translated (module doc) or Python cannot compile it."""
    translator = _Translator()
    try:
        code = translator.node(tree)
        source = f"def _filter(key, headers, timestamp):\n    return {code.src}\n"
        namespace = dict(_NAMESPACE)
        exec(compile(source, "<cel filter>", "exec"), namespace)  # noqa: S102 - our own generated source
    except (_Untranslated, SyntaxError, RecursionError, MemoryError, ValueError):
        return None
    return FilterProgram(source, namespace["_filter"], frozenset(translator.uses))


def _children(tree: lark.Tree) -> list[Any]:
    return [c for c in tree.children if c is not None]


class _Translator:
    def __init__(self) -> None:
        self.temps = 0
        self.uses: set[str] = set()

    def temp(self) -> str:
        self.temps += 1
        return f"_t{self.temps}"

    def node(self, tree: lark.Tree) -> _Code:
        kids = _children(tree)
        method = getattr(self, f"_{tree.data}", None)
        if method is not None:
            code: _Code = method(kids)
            return code
        if len(kids) == 1 and isinstance(kids[0], lark.Tree):  # a pass-through level
            return self.node(kids[0])
        raise _Untranslated(str(tree.data))

    # -- errors and operands -------------------------------------------------------------------

    def strict(self, codes: list[_Code], build: Callable[[list[str]], str], out_type: str,
               out_may_err: bool = False) -> _Code:
        """An operation that is an error when any operand is: the operands that may be ERR are
        bound to temporaries and tested first."""
        if any(c.type == ERRT for c in codes):
            return _ERR_CODE
        names: list[str] = []
        tests: list[str] = []
        for c in codes:
            if c.may_err:
                name = self.temp()
                tests.append(f"({name} := {c.src}) is ERR")
                names.append(name)
            else:
                names.append(c.src)
        body = build(names)
        if not tests:
            return _Code(f"({body})", out_type, out_may_err)
        return _Code(f"(ERR if {' or '.join(tests)} else {body})", out_type, True)

    # -- logic ---------------------------------------------------------------------------------

    def _expr(self, kids: list[Any]) -> _Code:
        if len(kids) == 1:
            return self.node(kids[0])
        cond, yes, no = (self.node(k) for k in kids)
        if cond.type == ERRT:
            return _ERR_CODE
        if cond.type != BOOL:
            raise _Untranslated("a condition that is not a bool")
        if yes.type != no.type and ERRT not in (yes.type, no.type):
            raise _Untranslated("branches of two types")
        out_type = no.type if yes.type == ERRT else yes.type
        t = self.temp()
        src = f"({yes.src} if ({t} := {cond.src}) is True else ({no.src} if {t} is False else ERR))"
        return _Code(src, out_type, cond.may_err or yes.may_err or no.may_err)

    def _logic(self, kids: list[Any], short: str) -> _Code:
        if len(kids) == 1:
            return self.node(kids[0])
        left, right = self.node(kids[0]), self.node(kids[1])
        for c in (left, right):
            if c.type not in (BOOL, ERRT):
                raise _Untranslated("a logical operand that is not a bool")
        if not left.may_err and not right.may_err:
            return _Code(f"({left.src} {'and' if short == 'False' else 'or'} {right.src})", BOOL, False)
        a, b = self.temp(), self.temp()
        src = (f"({a} if ({a} := {left.src}) is {short} else ({b} if ({b} := {right.src}) is {short} "
               f"else ({a} if {a} is ERR else {b})))")
        return _Code(src, BOOL, True)

    def _conditionalor(self, kids: list[Any]) -> _Code:
        return self._logic(kids, "True")

    def _conditionaland(self, kids: list[Any]) -> _Code:
        return self._logic(kids, "False")

    def _relation(self, kids: list[Any]) -> _Code:
        if len(kids) == 1:
            return self.node(kids[0])
        op_node, right_tree = kids
        left, right = self.node(_children(op_node)[0]), self.node(right_tree)
        if op_node.data == "relation_in":
            return self._in(left, right)
        op = _RELATIONS[str(op_node.data)]
        if ERRT in (left.type, right.type) or {left.type, right.type} == {INT, STR}:
            return _ERR_CODE
        if left.type != right.type or left.type not in _COMPARABLE:
            raise _Untranslated(f"{op} on {left.type} and {right.type}")
        return self.strict([left, right], lambda n: f"{n[0]} {op} {n[1]}", BOOL)

    def _in(self, left: _Code, right: _Code) -> _Code:
        if ERRT in (left.type, right.type):
            return _ERR_CODE
        if (left.type, right.type) == (STR, HEADERS) or right.type == f"list:{left.type}":
            return self.strict([left, right], lambda n: f"{n[0]} in {n[1]}", BOOL)
        raise _Untranslated(f"in on {left.type} and {right.type}")

    # -- arithmetic ----------------------------------------------------------------------------

    def _arithmetic(self, kids: list[Any]) -> _Code:
        if len(kids) == 1:
            return self.node(kids[0])
        op_node, right_tree = kids
        left, right = self.node(_children(op_node)[0]), self.node(right_tree)
        if ERRT in (left.type, right.type) or {left.type, right.type} == {INT, STR}:
            return _ERR_CODE
        if op_node.data == "addition_add" and left.type == right.type == STR:
            return self.strict([left, right], lambda n: f"{n[0]} + {n[1]}", STR)
        if left.type == right.type == INT:
            fn = _INT_OPS[str(op_node.data)]
            return self.strict([left, right], lambda n: f"{fn}({n[0]}, {n[1]})", INT, True)
        raise _Untranslated(f"{op_node.data} on {left.type} and {right.type}")

    _addition = _arithmetic
    _multiplication = _arithmetic

    def _unary(self, kids: list[Any]) -> _Code:
        if len(kids) == 1:
            return self.node(kids[0])
        op_node, operand_tree = kids
        operand = self.node(operand_tree)
        if operand.type == ERRT:
            return _ERR_CODE
        if op_node.data == "unary_not" and operand.type == BOOL:
            return self.strict([operand], lambda n: f"not {n[0]}", BOOL)
        if op_node.data == "unary_neg" and operand.type == INT:
            return self.strict([operand], lambda n: f"_neg({n[0]})", INT, True)
        raise _Untranslated(f"{op_node.data} on {operand.type}")

    # -- members, calls, literals --------------------------------------------------------------

    def _member_index(self, kids: list[Any]) -> _Code:
        container, index = self.node(kids[0]), self.node(kids[1])
        if ERRT in (container.type, index.type):
            return _ERR_CODE
        if container.type == HEADERS and index.type == STR:
            # an ERR index is no key of the dict, so .get gives ERR: no test needed
            return _Code(f"{container.src}.get({index.src}, ERR)", STR, True)
        raise _Untranslated(f"indexing {container.type}")

    def _member_dot(self, kids: list[Any]) -> _Code:
        container = self.node(kids[0])
        if container.type == HEADERS:
            return _Code(f"{container.src}.get({str(kids[1])!r}, ERR)", STR, True)
        raise _Untranslated(f"a field of {container.type}")

    def _member_dot_arg(self, kids: list[Any]) -> _Code:
        target = self.node(kids[0])
        name = str(kids[1])
        args = [self.node(e) for e in _children(kids[2])] if len(kids) > 2 else []
        if target.type == ERRT or any(a.type == ERRT for a in args):
            return _ERR_CODE
        if name == "size" and not args and target.type in (STR, HEADERS):
            return self.strict([target], lambda n: f"len({n[0]})", INT)
        if name in ("startsWith", "endsWith", "contains") and target.type == STR and [a.type for a in args] == [STR]:
            if name == "contains":
                return self.strict([target, args[0]], lambda n: f"{n[1]} in {n[0]}", BOOL)
            py = "startswith" if name == "startsWith" else "endswith"
            return self.strict([target, args[0]], lambda n: f"{n[0]}.{py}({n[1]})", BOOL)
        raise _Untranslated(f".{name}() on {target.type}")

    def _ident_arg(self, kids: list[Any]) -> _Code:
        name = str(kids[0])
        arg_trees = _children(kids[1]) if len(kids) > 1 else []
        if name == "has" and len(arg_trees) == 1:
            return self._has(arg_trees[0])
        args = [self.node(e) for e in arg_trees]
        if len(args) != 1:
            raise _Untranslated(f"{name}() with {len(args)} arguments")
        arg = args[0]
        if arg.type == ERRT:
            return _ERR_CODE
        if name == "size" and arg.type in (STR, HEADERS):
            return self.strict([arg], lambda n: f"len({n[0]})", INT)
        if (name, arg.type) in (("int", INT), ("string", STR), ("bool", BOOL)):
            return arg
        if (name, arg.type) == ("string", INT):
            return self.strict([arg], lambda n: f"str({n[0]})", STR)
        raise _Untranslated(f"{name}({arg.type})")

    def _has(self, arg: lark.Tree) -> _Code:
        """has(headers.name): a field test, never an error."""
        node = arg
        while node.data != "member_dot":
            kids = _children(node)
            if len(kids) != 1 or not isinstance(kids[0], lark.Tree):
                raise _Untranslated("has() of something other than a field")
            node = kids[0]
        kids = _children(node)
        if self.node(kids[0]).type != HEADERS:
            raise _Untranslated("has() of a field that is not a header")
        return _Code(f"({str(kids[1])!r} in headers)", PYBOOL, False)

    def _ident(self, kids: list[Any]) -> _Code:
        name = str(kids[0])
        types = {"key": STR, "headers": HEADERS, "timestamp": INT}
        if name not in types:
            raise _Untranslated(f"variable {name}")
        self.uses.add(name)
        return _Code(name, types[name], False)

    def _paren_expr(self, kids: list[Any]) -> _Code:
        return self.node(kids[0])

    def _list_lit(self, kids: list[Any]) -> _Code:
        items = [self.node(e) for e in _children(kids[0])] if kids else []
        kinds = {i.type for i in items}
        if len(kinds) != 1 or not kinds <= _COMPARABLE or any(i.may_err for i in items):
            raise _Untranslated("a list literal that is empty, mixed or may fail")
        return _Code(f"({', '.join(i.src for i in items)},)", f"list:{kinds.pop()}", False)

    def _literal(self, kids: list[Any]) -> _Code:
        token = kids[0]
        text = str(token)
        if token.type in ("STRING_LIT", "MLSTRING_LIT"):
            return _Code(repr(str(celstr(token))), STR, False)
        if token.type == "BOOL_LIT":
            return _Code(repr(text == "true"), BOOL, False)
        if token.type == "INT_LIT":
            digits = text.lstrip("-")
            if digits[:2].lower() == "0x":
                value = int(digits[2:], 16)
            elif len(digits) > 1 and digits.startswith("0"):
                raise _Untranslated("an int literal with a leading zero")
            else:
                value = int(digits)
            value = -value if text.startswith("-") else value
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise _Untranslated("an int literal outside int64")
            return _Code(f"({value!r})", INT, False)
        raise _Untranslated(f"a {token.type} literal")
