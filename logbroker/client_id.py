"""The client id: a name a client gives itself so brokers can tell its requests apart (logs, the
audit log, and later quotas), as Kafka's `client.id`. It is a label, never an identity: the broker
trusts only the connection's principal (certificate or SASL) for authentication and authorization.

Rule (checked by the clients before they connect and by the broker on every call):
1 to CLIENT_ID_MAX_CHARS characters from [A-Za-z0-9._-]. The empty string means "none given" (a
caller without the metadata, e.g. grpcurl); the Python clients send DEFAULT_CLIENT_ID unless told.

How it travels:
- gRPC: the metadata entry `client-id` (CLIENT_ID_METADATA) on every call.
- The record transport (logbroker/wire.py): one API_CLIENT_ID frame right after the connection is
  established (after TLS and SASL); its body is the id in ASCII and the answer an empty OK. The
  broker keeps it in the connection's RequestContext for every later frame.
A broker refuses a malformed id with INVALID_ARGUMENT (the whole call, or the frame).
"""

from __future__ import annotations

import re

CLIENT_ID_METADATA = "client-id"
DEFAULT_CLIENT_ID = "logbroker-python"
CLIENT_ID_MAX_CHARS = 128
_LEGAL = re.compile(rf"[A-Za-z0-9._-]{{1,{CLIENT_ID_MAX_CHARS}}}")


def client_id_problem(client_id: object) -> str | None:
    """Why `client_id` is not a legal client id (a message safe to show: the value is cut short and
    shown with repr), or None when it is."""
    if not isinstance(client_id, str):
        return f"client id must be a str, not {type(client_id).__name__}"
    if _LEGAL.fullmatch(client_id) is None:
        shown = client_id[:40] + ("..." if len(client_id) > 40 else "")
        return (f"client id {shown!r} ({len(client_id)} characters) is not 1-{CLIENT_ID_MAX_CHARS} characters "
                f"of [A-Za-z0-9._-]")
    return None


def checked_client_id(client_id: object) -> str:
    """`client_id` itself, or ValueError saying why it is not legal."""
    problem = client_id_problem(client_id)
    if problem is not None:
        raise ValueError(problem)
    assert isinstance(client_id, str)
    return client_id
