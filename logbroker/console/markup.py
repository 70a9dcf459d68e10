"""HTML with autoescaping: `html(template, *args)` escapes every argument (quotes included) unless it
is `Markup` (HTML built here already), so a value from the cluster (a topic name, a record's key,
value or headers: untrusted) can only ever land in a page as text. `join` concatenates fragments.
Templates are literals in pages.py; nothing else makes `Markup` from a string."""

from __future__ import annotations

import html as _html
from collections.abc import Iterable


class Markup(str):
    """A string that is HTML already (built by `html`/`join`): not escaped again."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """`value` as HTML text: Markup as is, None as "", anything else str() with &, <, >, " and ' escaped."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(_html.escape(str(value), quote=True))


def html(template: str, *args: object, **kwargs: object) -> Markup:
    """`template.format(...)` with every argument escaped (the template itself is trusted: a literal)."""
    return Markup(template.format(*(escape(a) for a in args), **{k: escape(v) for k, v in kwargs.items()}))


def join(parts: Iterable[object], sep: str = "") -> Markup:
    """The fragments, each escaped unless Markup, joined by the trusted `sep`."""
    return Markup(sep.join(escape(p) for p in parts))
