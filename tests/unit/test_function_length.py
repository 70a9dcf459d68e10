"""No function in logbroker/ over FUNCTION_LINES_MAX lines, unless its first lines say why.

Generated code (logbroker/v1) is left out. A long function stays only with a comment opening its
body that starts "# Over 80 lines on purpose:" and gives the reason (record_batch.decode_batch: the
consumer's per-record hot loop, where a call per record costs more than the whole decode).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_LINES_MAX = 80
REASON_MARK = "# Over 80 lines on purpose:"


def _long_functions() -> list[str]:
    found = []
    for path in sorted((ROOT / "logbroker").rglob("*.py")):
        if "v1" in path.relative_to(ROOT / "logbroker").parts:
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length <= FUNCTION_LINES_MAX:
                continue
            head = "\n".join(lines[node.lineno - 1: node.lineno + 25])
            if REASON_MARK not in head:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_the_limit_without_a_reason() -> None:
    assert _long_functions() == []
