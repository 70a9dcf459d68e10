"""The audit log: one JSON object per line on the `logbroker.audit` logger, for every refused call
and every administrative change (topics, partitions, reassignments, groups, ACLs, users, quotas).

    {"audit": "denied", "api": "Produce", "principal": "User:bob", "peer": "ipv4:10.0.0.7:51200",
     "client_id": "billing-7", "operation": "Write", "resource_type": "Topic", "resource": "orders"}
    {"audit": "change", "api": "CreateTopics", "principal": "User:ops", "peer": "...",
     "client_id": "logbroker-python", "resources": ["Topic:orders"], "outcome": "ok"}

Fields are the call's names only: never a record, a password, a credential's salt or keys, a
cluster secret or a certificate. `client_id` is what the caller calls itself (logbroker/client_id.py;
"" when it gave none): a label, never the identity (that is `principal`). `outcome` is "ok", or the error code names of the answer, or the
exception's type when the call failed whole. Route the logger to its own file with the standard
`logging` configuration; it is on by default at INFO.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger("logbroker.audit")


def _names(prefix: str, names: Any) -> list[str]:
    return [f"{prefix}:{n}" for n in names]


def _quota_entity(e: Any) -> str:
    return ",".join(f"{f}={getattr(e, f)}" for f in ("user", "client_id") if e.HasField(f)) or "-"


def _quota_rates(e: Any) -> str:
    return ",".join(f"{f}={getattr(e, f):g}" for f in ("producer_byte_rate", "consumer_byte_rate",
                                                        "request_percentage") if e.HasField(f))


# the resources an administrative call changes, read from its request (names only)
AUDITED: dict[str, Callable[[Any], list[str]]] = {
    "CreateTopics": lambda r: _names("Topic", (t.name for t in r.topics)),
    "DeleteTopics": lambda r: _names("Topic", r.names),
    "CreatePartitions": lambda r: _names("Topic", [r.name]),
    "ReassignPartition": lambda r: [f"Partition:{r.topic}-{r.partition}"],
    "RecoverEmptyPartition": lambda r: [f"Partition:{r.topic}-{r.partition}"],
    "DeleteGroup": lambda r: _names("Group", [r.group]),
    "AlterShareGroup": lambda r: _names("Group", [r.group]),
    "PurgeShareGroup": lambda r: _names("Group", [r.group]),
    "CreateAcls": lambda r: [f"Acl:{e.permission} {e.principal} {e.operation} {e.resource_type}:{e.pattern_type}:{e.name}"
                             for e in r.acls],
    "DeleteAcls": lambda r: [f"AclFilter:{r.filter.principal or '*'} {r.filter.resource_type or '*'}:"
                             f"{r.filter.name or '*'}"],
    "AlterUserScramCredentials": lambda r: ([f"User:{u.user} {u.mechanism}" for u in r.upserts]
                                           + [f"User:{u} deleted" for u in r.deletions]),
    "AlterClientQuotas": lambda r: ([f"Quota:{_quota_entity(e)} {_quota_rates(e)}" for e in r.set]
                                    + [f"Quota:{_quota_entity(e)} deleted" for e in r.deletions]),
}


def emit(event: dict[str, Any]) -> None:
    log.info(json.dumps(event, separators=(",", ":")))


def denied(api: str, principal: str, context: RequestContext, operation: str, resource_type: str,
           resource: str) -> None:
    emit({"audit": "denied", "api": api, "principal": principal, "peer": context.peer,
          "client_id": context.client_id, "operation": operation, "resource_type": resource_type, "resource": resource})


def _outcome(response: Message | bytes) -> str:
    if not isinstance(response, Message):
        return "ok"
    codes: list[int] = []
    for field, value in response.ListFields():
        if field.name == "error_code":
            codes.append(value)
        elif field.name == "results":
            codes.extend(getattr(x, "error_code", 0) for x in value)
        elif field.name == "result":
            codes.append(getattr(value, "error_code", 0))
    bad = sorted({pb.ErrorCode.Name(c) for c in codes if c})
    return ",".join(bad) or "ok"


async def audited(api: str, context: RequestContext, request: Message, call: Awaitable[Message | bytes],
                  principal: str) -> Message | bytes:
    """Await an administrative call and log it with its outcome (also when it fails whole)."""
    event = {"audit": "change", "api": api, "principal": principal, "peer": context.peer,
             "client_id": context.client_id, "resources": AUDITED[api](request)}
    try:
        response = await call
    except BaseException as e:
        emit({**event, "outcome": type(e).__name__})
        raise
    emit({**event, "outcome": _outcome(response)})
    return response
