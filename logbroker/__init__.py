"""logbroker: a Kafka-style partitioned log broker, and its Python client.

The client classes are re-exported here and imported lazily, so the broker process (which imports
`logbroker.*` modules) never loads the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from logbroker.client import (
        Admin,
        Consumer,
        Message,
        PartitionInfo,
        Producer,
        QueueConsumer,
        QueueMessage,
        RecordMetadata,
        Reply,
        Requester,
        Responder,
        SaslConfig,
        TlsConfig,
        TopicDescription,
    )

__all__ = [
    "Admin",
    "Consumer",
    "Message",
    "PartitionInfo",
    "Producer",
    "QueueConsumer",
    "QueueMessage",
    "RecordMetadata",
    "Reply",
    "Requester",
    "Responder",
    "SaslConfig",
    "TlsConfig",
    "TopicDescription",
    "__version__",
]

_CLIENT_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import logbroker.client as client

        return getattr(client, name)
    raise AttributeError(f"module 'logbroker' has no attribute {name!r}")
