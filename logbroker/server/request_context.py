"""Who is calling, and how a whole call is refused: the request layer's neutral vocabulary.

Every listener (the gRPC servicers, the record transport, later a Kafka listener) builds one
`RequestContext` per request (the record transport: one per connection) and hands it with the
decoded request to `server/apis`. A call that cannot be answered partition by partition raises
`RequestRejected(status, message)`; each adapter maps `RequestStatus` to its own status: gRPC to
`grpc.StatusCode` (server/rpc.py), the record transport to its status byte (logbroker/wire.py).
The status numbers are gRPC's, so both maps are the identity on the number. No grpc import here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ANONYMOUS = "ANONYMOUS"  # the principal of every call until authentication exists
LISTENER_GRPC = "grpc"
LISTENER_RECORD = "record"  # the record transport (logbroker/wire.py)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """One caller: `principal` (ANONYMOUS until authentication), `client_id` (what the caller calls
    itself: the call's `client-id` metadata, or the record-transport connection's API_CLIENT_ID
    frame; checked by logbroker/client_id.py's rule, "" when none; a label for logs and quotas,
    never trusted for authentication or authorization), `peer` (the listener's view of the address), `listener`
    (LISTENER_GRPC, LISTENER_RECORD), and `presented_cluster_secret`: what the caller offered as
    the inter-broker secret (None: nothing, as always on the record transport)."""

    principal: str = ANONYMOUS
    client_id: str = ""
    peer: str = ""
    listener: str = LISTENER_GRPC
    presented_cluster_secret: bytes | None = None


class RequestStatus(enum.IntEnum):
    """Why a whole call was refused. The values are the gRPC status numbers (the record
    transport's status byte carries the same numbers)."""

    CANCELLED = 1
    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class RequestRejected(Exception):
    """Refuse the whole call (for requests that cannot be answered per partition)."""

    def __init__(self, status: RequestStatus, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_ms = retry_after_ms  # an overload refusal's hint (server/admission.py), else None
