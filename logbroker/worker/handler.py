"""The user's handler: `def handle(message: Message) -> None`, named `module:function` on the command line.

`load_handler("orders.billing:handle")` imports `orders.billing` and returns its attribute `handle`
(a dotted path after the colon reaches into classes: `mod:Handlers.on_order`). Every way this can go
wrong raises `HandlerSpecError` with one line a user can act on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from logbroker.errors import LogbrokerError
from logbroker.storage.record_batch import Message

Handler = Callable[[Message], object]
SPEC_CHARS_MAX = 1_000


class HandlerSpecError(LogbrokerError):
    """The `module:function` reference does not name an importable callable."""


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """'pkg.mod:obj.attr' -> ('pkg.mod', ['obj', 'attr'])."""
    if len(spec) > SPEC_CHARS_MAX:
        raise HandlerSpecError(f"handler reference longer than {SPEC_CHARS_MAX} characters")
    module, sep, attr = spec.partition(":")
    names = attr.split(".")
    if (
        not sep
        or not module
        or not all(part.isidentifier() for part in module.split("."))
        or not all(name.isidentifier() for name in names)
    ):
        raise HandlerSpecError(f"handler must be MODULE:FUNCTION (e.g. myapp.handlers:handle), got {spec!r}")
    return module, names


def load_handler(spec: str) -> Handler:
    module_name, names = parse_spec(spec)
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise HandlerSpecError(
                f"cannot import module {module_name!r}: no module named {e.name!r} "
                "(run from its directory or put that on PYTHONPATH)"
            ) from None
        raise HandlerSpecError(f"importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    except Exception as e:
        raise HandlerSpecError(f"importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    for i, name in enumerate(names):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            where = module_name + (":" + ".".join(names[:i]) if i else "")
            raise HandlerSpecError(f"{where} has no attribute {name!r}") from None
    if not callable(obj):
        raise HandlerSpecError(f"{spec} is not callable (it is a {type(obj).__name__})")
    return obj
