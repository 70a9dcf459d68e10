"""The console's pages as HTML, rendered on the server (no script; the lag chart is inline SVG).
Every value from the cluster goes through markup.html's escaping; links quote path segments."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlencode

from logbroker.client.admin import GroupListing, TopicDescription
from logbroker.console.markup import Markup, html, join
from logbroker.console.views import RENDER_MODES, BrowseQuery, LagSample, PartitionRate, chart, render_value
from logbroker.storage.record_batch import Message

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1d3557;color:#fff;padding:.6em 1em}header a{color:#fff;margin-right:1.2em;text-decoration:none}
main{padding:1em}table{border-collapse:collapse;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#eef}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#b00;font-weight:bold}.ok{color:#070}
pre{margin:0;white-space:pre-wrap;word-break:break-all;max-width:70em}.note{color:#777;font-size:.9em}
.error{border:1px solid #b00;background:#fee;padding:1em}form{margin:.5em 0}
"""


def link(path: str, *segments: str, **query: object) -> str:
    """A console URL: `path` then each segment quoted (no '/' left in it), then the query string."""
    url = path + "".join("/" + quote(s, safe="") for s in segments)
    return url + ("?" + urlencode({k: v for k, v in query.items()}) if query else "")


def _num(v: float | int | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def page(title: str, body: Markup, read_write: bool = False) -> Markup:
    mode = "read-write" if read_write else "read-only"
    return html("<!doctype html><html><head><meta charset='utf-8'><title>{} - logbroker console</title>"
                "<style>{}</style></head><body><header><b>logbroker console</b> &nbsp; "
                "<a href='/'>Cluster</a><a href='/topics'>Topics</a><a href='/groups'>Groups</a>"
                "<a href='/queues'>Queues</a><span class='note'>{}</span></header><main><h1>{}</h1>{}</main>"
                "</body></html>", title, Markup(_STYLE), mode, title, body)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[int] = (),
          css_id: str = "") -> Markup:
    head = join(html("<th>{}</th>", h) for h in headers)
    body = join(html("<tr>{}</tr>", join(html("<td class='n'>{}</td>" if i in numeric else "<td>{}</td>", c)
                                         for i, c in enumerate(r))) for r in rows)
    return html("<table id='{}'><tr>{}</tr>{}</table>", css_id, head, body)


def error_page(status: int, message: str) -> Markup:
    return page(f"Error {status}", html("<div class='error' id='error'>{}</div>", message))


def _health(h: dict[str, int]) -> Markup:
    rows = [(k.replace("_", " "), html("<span class='{}'>{}</span>", "bad" if h[k] and k != "partitions" else "ok",
                                       h[k])) for k in ("partitions", "offline", "under_replicated", "under_min_isr")]
    return table(["", "partitions"], rows, numeric=[1], css_id="health")


def cluster_page(data: dict[str, Any], read_write: bool) -> Markup:
    brokers = [(b["broker_id"], f"{b['host']}:{b['port']}" if b["alive"] else "-", b["rack"] or "-",
                "controller" if b["controller"] else "", "alive" if b["alive"] else "not registered")
               for b in data["brokers"]]
    body = html("<p>Cluster id <code>{}</code>, controller <b id='controller'>broker {}</b>, {} topics.</p>"
                "<h2>Brokers</h2>{}<h2>Health</h2>{}<h2>Top partitions by size</h2>{}",
                data["cluster_id"] or "-", data["controller_id"], data["topic_count"],
                table(["id", "host:port", "rack", "role", "state"], brokers, css_id="brokers"),
                _health(data["health"]),
                table(["topic", "partition", "leader", "bytes", "end offset", "records/s"],
                      [(html("<a href='{}'>{}</a>", link("/topics", r["topic"]), r["topic"]), r["partition"],
                        r["leader"], r["size_bytes"], r["end_offset"], _num(r["records_per_sec"]))
                       for r in data["top_partitions"]], numeric=[1, 2, 3, 4, 5]))
    return page("Cluster", body, read_write)


def topics_page(data: dict[str, Any], read_write: bool, csrf: str) -> Markup:
    rows = [(html("<a href='{}'>{}</a>", link("/topics", t["name"]), t["name"]), t["partitions"], t["size_bytes"],
             t["end_offset"], t["records"], _num(t["records_per_sec"]), _num(t["bytes_per_sec"]))
            for t in data["topics"]]
    body = table(["topic", "partitions", "bytes", "end offset", "records", "records/s", "bytes/s"], rows,
                 numeric=[1, 2, 3, 4, 5, 6], css_id="topics")
    if read_write:
        body = join([body, html(
            "<h2>Create a topic</h2><form method='post' action='/topics'><input type='hidden' name='csrf' value='{}'>"
            "name <input name='name' required> partitions <input name='partitions' value='1' size='4'> "
            "replication factor <input name='replication_factor' value='1' size='4'> "
            "<button>create</button></form>", csrf)])
    return page("Topics", body, read_write)


def topic_page(t: TopicDescription, rates: dict[int, PartitionRate], read_write: bool) -> Markup:
    rows = []
    for p in t.partitions:
        r = rates.get(p.partition, PartitionRate(None, None))
        isr_cls = "bad" if len(p.isr) < len(p.replicas) else "ok"
        rows.append((p.partition, p.leader if p.leader >= 0 else html("<span class='bad'>none</span>"),
                     join((str(x) for x in p.replicas), ","), html("<span class='{}'>{}</span>", isr_cls,
                                                                    ",".join(str(x) for x in p.isr)),
                     p.log_start_offset, p.high_watermark, p.size_bytes, _num(r.records_per_sec),
                     _num(r.bytes_per_sec),
                     html("<a href='{}'>browse</a>", link("/topics", t.name, "messages", partition=p.partition,
                                                           offset=p.log_start_offset))))
    config = table(["setting", "value"], sorted(t.config.items()), css_id="config")
    body = html("<h2>Partitions</h2>{}<h2>Configuration</h2>{}",
                table(["partition", "leader", "replicas", "ISR", "start offset", "end offset", "bytes", "records/s",
                       "bytes/s", ""], rows, numeric=[0, 4, 5, 6, 7, 8], css_id="partitions"), config)
    return page(f"Topic {t.name}", body, read_write)


def groups_page(groups: Sequence[GroupListing], read_write: bool, title: str = "Consumer groups",
                base: str = "/groups") -> Markup:
    rows = [(html("<a href='{}'>{}</a>", link(base, g.group), g.group), g.state, g.members, g.coordinator_id)
            for g in groups]
    body = table(["group", "state", "members", "coordinator"], rows, numeric=[2, 3], css_id="groups") if rows \
        else html("<p>No groups.</p>")
    return page(title, body, read_write)


def lag_chart(samples: Sequence[LagSample]) -> Markup:
    c = chart(samples)
    if not c.points:
        return html("<p class='note' id='lag-chart'>No lag sample yet.</p>")
    points = " ".join(f"{x},{y}" for x, y in c.points)
    when = time.strftime("%H:%M:%S", time.localtime(c.first_at_s or 0)), \
        time.strftime("%H:%M:%S", time.localtime(c.last_at_s or 0))
    return html("<svg id='lag-chart' xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' "
                "viewBox='0 0 {} {}' role='img' aria-label='total lag over time' "
                "style='background:#fff;border:1px solid #ccc'><line x1='0' y1='{}' x2='{}' y2='{}' stroke='#ddd'/>"
                "<text x='6' y='16' font-size='12' fill='#777'>{}</text>"
                "<text x='6' y='{}' font-size='12' fill='#777'>0</text><polyline fill='none' stroke='#1d3557' "
                "stroke-width='2' points='{}'/></svg><p class='note'>total lag, {} samples from {} to {}; "
                "max {}</p>", c.width, c.height, c.width, c.height, c.height - 4, c.width, c.height - 4,
                c.max_lag, c.height - 8, points, len(samples), when[0], when[1], c.max_lag)


def group_page(view: Any, samples: Sequence[LagSample], read_write: bool, csrf: str) -> Markup:
    d = view.description
    members = [(m.member_id, m.client_host or "-", m.state, ",".join(m.subscribed_topics) or m.subscribed_regex,
                ", ".join(f"{t}-{p}" for t, p in m.assigned) or "-") for m in d.members]
    lags = [(r.topic, r.partition, _num(r.current_offset), _num(r.log_end_offset), _num(r.lag), r.member_id or "-")
            for r in view.lags]
    body = html("<p>State <b>{}</b>, epoch {}, assignor {}, coordinator broker {}.</p><h2>Members</h2>{}"
                "<h2>Lag per partition</h2>{}<h2>Lag over time</h2>{}", d.state, d.group_epoch, d.assignor or "-",
                d.coordinator_id,
                table(["member", "host", "state", "subscribed", "assigned"], members, css_id="members"),
                table(["topic", "partition", "committed", "end offset", "lag", "member"], lags,
                      numeric=[1, 2, 3, 4], css_id="lag"), lag_chart(samples))
    if read_write:
        body = join([body, html("<form method='post' action='{}'><input type='hidden' name='csrf' value='{}'>"
                                "<button>delete the group's offsets (no members allowed)</button></form>",
                                link("/groups", d.group, "delete"), csrf)])
    return page(f"Group {d.group}", body, read_write)


_QUEUE_COLUMNS = ("start_offset", "end_offset", "in_flight", "acquired", "available", "delayed", "dead_lettered",
                  "expired", "acknowledged", "oldest_unsettled_age_ms")


def queue_page(d: dict[str, Any], dlqs: Sequence[TopicDescription], read_write: bool) -> Markup:
    settings = table(["setting", "value"], sorted(d["settings"].items()), css_id="settings")
    members = table(["member", "epoch", "topics"], [(m.get("member_id"), m.get("member_epoch"),
                                                     ", ".join(m.get("topics") or [])) for m in d["members"]])
    parts = table(["topic", "partition", *(c.replace("_", " ") for c in _QUEUE_COLUMNS)],
                  [(p["topic"], p["partition"], *(p.get(c, "-") for c in _QUEUE_COLUMNS)) for p in d["partitions"]],
                  numeric=range(1, 2 + len(_QUEUE_COLUMNS)), css_id="queue-partitions")
    if not dlqs:
        dead = html("<p>No dead letters{}.</p>", "" if d["settings"].get("dead_letter_topic") else
                    " (no dead-letter topic configured)")
    else:
        dead = table(["dead-letter topic", "partition", "dead letters (end - start)", ""],
                     [(html("<a href='{}'>{}</a>", link("/topics", t.name), t.name), p.partition,
                       p.high_watermark - p.log_start_offset,
                       html("<a href='{}'>browse</a>", link("/topics", t.name, "messages", partition=p.partition,
                                                             offset=p.log_start_offset)))
                      for t in dlqs for p in t.partitions], numeric=[1, 2], css_id="dead-letters")
    body = html("<p>Coordinator broker {}.</p><h2>Settings</h2>{}<h2>Members</h2>{}<h2>Partitions</h2>{}"
                "<h2>Dead letters</h2>{}", d["coordinator_id"], settings, members, parts, dead)
    return page(f"Share group {d['group']}", body, read_write)


def _headers(m: Message) -> Markup:
    if not m.headers:
        return html("<span class='note'>none</span>")
    return join((html("<div><b>{}</b>: {}</div>", k, render_value(v, "text").text) for k, v in m.headers), "")


def _value_cell(data: bytes | None, mode: str) -> Markup:
    r = render_value(data, mode)
    note = html("<div class='note'>{}</div>", r.note) if r.note else Markup("")
    return html("<pre>{}</pre>{}", r.text, note)


def browse_page(q: BrowseQuery, t: TopicDescription, messages: Sequence[Message], read_write: bool) -> Markup:
    parts = join(html("<option value='{}'{}>{}</option>", p.partition,
                      Markup(" selected") if p.partition == q.partition else Markup(""), p.partition)
                 for p in t.partitions)
    views = join(html("<option{}>{}</option>", Markup(" selected") if v == q.mode else Markup(""), v)
                 for v in RENDER_MODES)
    form = html("<form method='get' id='browse'>partition <select name='partition'>{}</select> offset "
                "<input name='offset' value='{}' size='10'> count <input name='count' value='{}' size='4'> "
                "view <select name='view'>{}</select> <button>read</button></form>", parts, q.offset, q.count, views)
    ts = [time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.timestamp / 1000)) + "Z" if m.timestamp >= 0 else "-"
          for m in messages]
    rows = [(m.offset, ts[i], _value_cell(m.key, "text" if q.mode == "json" else q.mode), _headers(m),
             _value_cell(m.value if isinstance(m.value, bytes | None) else str(m.value).encode(), q.mode))
            for i, m in enumerate(messages)]
    nxt = messages[-1].offset + 1 if messages else q.offset
    more = html("<p><a id='next' href='{}'>next {}</a></p>", link("/topics", q.topic, "messages",
                partition=q.partition, offset=nxt, count=q.count, view=q.mode), q.count)
    body = html("{}{}{}", form, table(["offset", "timestamp", "key", "headers", "value"], rows, numeric=[0],
                                      css_id="messages") if rows else html("<p id='messages'>No records there.</p>"),
                more)
    return page(f"Messages of {q.topic}-{q.partition}", body, read_write)
