"""bench report regenerates RESULTS.md but carries the hand-kept comparisons over."""

from __future__ import annotations

from bench.report import KEPT_HEADING, kept_sections


def test_the_kept_tail_is_found_and_nothing_else() -> None:
    previous = f"# results\n\n## max-100b\n\n| a |\n\n{KEPT_HEADING}\n\n### issue 14\n\nfigures\n"
    assert kept_sections(previous) == f"{KEPT_HEADING}\n\n### issue 14\n\nfigures\n"
    assert kept_sections("# results\n\n## max-100b\n") == ""
