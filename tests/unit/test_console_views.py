"""The console's pure parts (logbroker/console/views.py, markup.py, pages.py, server routing of
refusals): lag history bounds, rates, value rendering and escaping of untrusted values. No sockets."""

from __future__ import annotations

from typing import Any

import pytest

from logbroker.client.admin import PartitionInfo, TopicDescription
from logbroker.console import pages
from logbroker.console.markup import Markup, escape, html, join
from logbroker.console.server import Console
from logbroker.console.views import (
    BROWSE_COUNT_MAX,
    VALUE_SHOW_MAX_BYTES,
    BrowseQuery,
    ConsoleInputError,
    LagHistory,
    LagSample,
    Rendered,
    chart,
    partition_rates,
    render_value,
    total_lag,
)
from logbroker.storage.record_batch import Message

EVIL = "<script>alert('x')</script>&\""


def _p(partition: int, hw: int, size: int, isr: list[int] | None = None) -> PartitionInfo:
    return PartitionInfo(partition, 1, [1, 2], isr if isr is not None else [1, 2], 0, 0, hw, hw, size)


def _topic(*parts: PartitionInfo, name: str = "t", topic_id: str = "a") -> TopicDescription:
    return TopicDescription(name, {}, list(parts), topic_id)


def test_lag_history_keeps_the_last_samples_of_each_group() -> None:
    h = LagHistory(samples_max=3, groups_max=10)
    for i in range(10):
        h.record("g", float(i), i * 10)
    assert [s.at_s for s in h.samples("g")] == [7.0, 8.0, 9.0]
    assert h.samples("other") == []
    h.record("g", 10.0, -5)  # a negative lag (a stale end offset) is shown as 0
    assert h.samples("g")[-1] == LagSample(10.0, 0)


def test_lag_history_drops_the_group_sampled_longest_ago() -> None:
    h = LagHistory(samples_max=5, groups_max=2)
    h.record("a", 1.0, 1)
    h.record("b", 2.0, 1)
    h.record("a", 3.0, 1)  # a sampled again: b is now the oldest
    h.record("c", 4.0, 1)
    assert h.groups() == ["a", "c"]
    with pytest.raises(ValueError):
        LagHistory(samples_max=0)


def test_total_lag_counts_known_lags_only() -> None:
    assert total_lag([3, None, 4, -1]) == 7


def test_partition_rates_from_two_reads() -> None:
    before = _topic(_p(0, 100, 1000), _p(1, 50, 500))
    now = _topic(_p(0, 300, 3000), _p(1, 40, 400), _p(2, 10, 10))
    r = partition_rates(now, before, 2.0)
    assert (r[0].records_per_sec, r[0].bytes_per_sec) == (100.0, 1000.0)
    assert (r[1].records_per_sec, r[1].bytes_per_sec) == (0.0, 0.0)  # went back (recreated, retention): 0
    assert r[2].records_per_sec is None  # new since: no rate
    assert all(v.records_per_sec is None for v in partition_rates(now, None, None).values())
    assert all(v.records_per_sec is None for v in partition_rates(now, before, 0.0).values())
    other = _topic(_p(0, 1, 1), topic_id="b")  # another incarnation of the name
    assert partition_rates(now, other, 1.0)[0].records_per_sec is None


def test_chart_spans_the_box_with_lag_zero_at_the_bottom() -> None:
    c = chart([LagSample(10.0, 0), LagSample(20.0, 50), LagSample(30.0, 100)], width=104, height=54, pad=2)
    assert c.points == [(2.0, 52.0), (52.0, 27.0), (102.0, 2.0)] and c.max_lag == 100
    assert chart([]).points == []
    assert len(chart([LagSample(1.0, 5)]).points) == 1


def test_render_value_text_json_hex() -> None:
    assert render_value(b"hello \xff", "text").text == "hello \ufffd"
    assert render_value(b'{"a":[1,2]}', "json").text == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert render_value(b"not json", "json") == Rendered("not json", "not JSON: shown as text")
    assert render_value(b"AB\x00", "hex").text == "00000000  41 42 00" + " " * 39 + "  AB."
    assert render_value(None, "text").note == "null"
    big = render_value(b"x" * (VALUE_SHOW_MAX_BYTES + 5), "text")
    assert len(big.text) == VALUE_SHOW_MAX_BYTES and "of" in big.note
    with pytest.raises(ConsoleInputError):
        render_value(b"", "xml")


def test_markup_escapes_everything_but_markup() -> None:
    assert escape(EVIL) == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;"
    assert html("<b>{}</b>", EVIL) == "<b>" + escape(EVIL) + "</b>"
    assert html("<b>{}</b>", Markup("<i>ok</i>")) == "<b><i>ok</i></b>"
    assert join(["<", Markup("<br>")]) == "&lt;<br>"
    assert escape(None) == ""


def test_pages_escape_untrusted_names_keys_values_and_headers() -> None:
    t = _topic(_p(0, 1, 10), name=EVIL)
    m = Message(EVIL, 0, 0, EVIL.encode(), ('{"v": "' + "<img src=x onerror=alert(1)>" + '"}').encode(),
                [(EVIL, EVIL.encode())], 0)
    for mode in ("text", "json", "hex"):
        out = pages.browse_page(BrowseQuery(EVIL, 0, 0, 10, mode), t, [m], read_write=False)
        assert "<script>" not in out and "<img" not in out and "onerror=alert(1)>" not in out
    out = pages.topic_page(t, {}, read_write=False)
    assert "<script>" not in out and "%3Cscript%3E" in out  # the link quotes the name
    assert "<script>" not in pages.error_page(404, EVIL)


def test_browse_query_bounds() -> None:
    q = BrowseQuery.parse("t", {})
    assert (q.partition, q.offset, q.count, q.mode) == (0, 0, 20, "text")
    q = BrowseQuery.parse("t", {"partition": "2", "offset": "7", "count": str(BROWSE_COUNT_MAX), "view": "hex"})
    assert (q.partition, q.offset, q.count, q.mode) == (2, 7, BROWSE_COUNT_MAX, "hex")
    for bad in ({"count": "0"}, {"count": str(BROWSE_COUNT_MAX + 1)}, {"offset": "-1"}, {"offset": "x"},
                {"view": "xml"}):
        with pytest.raises(ConsoleInputError):
            BrowseQuery.parse("t", bad)


class _NoCluster:
    """Reached only if a refused request went on to the cluster (it must not)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the cluster was asked ({name})")


def test_a_read_only_console_refuses_changes_and_a_read_write_one_wants_its_token() -> None:
    status, body = Console(_NoCluster(), read_write=False).handle("POST", "/topics", {}, {"name": "x"})  # type: ignore[arg-type]
    assert status == 403 and "read-only" in body
    rw = Console(_NoCluster(), read_write=True)  # type: ignore[arg-type]
    status, body = rw.handle("POST", "/topics", {}, {"name": "x", "csrf": "forged"})
    assert status == 403 and "token" in body
    status, body = rw.handle("GET", "/topics/t/messages", {"count": "1000"}, {})
    assert status == 400 and "count must be in" in body and "Traceback" not in body
    status, body = rw.handle("GET", "/no/such/page/here", {}, {})
    assert status == 404
