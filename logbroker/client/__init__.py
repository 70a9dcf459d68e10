"""The logbroker client: Producer, Consumer and Admin over gRPC (synchronous API)."""

from logbroker.client.admin import (
    Admin,
    GroupDescription,
    GroupListing,
    GroupMemberInfo,
    PartitionInfo,
    PartitionLag,
    TopicDescription,
)
from logbroker.client.consumer import Consumer
from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.producer import FutureRecordMetadata, FutureRecordsMetadata, Producer, RecordMetadata
from logbroker.client.queue import QueueConsumer, QueueMessage
from logbroker.client.requester import Reply, Requester
from logbroker.client.responder import Responder
from logbroker.client.sasl import SaslConfig
from logbroker.storage.record_batch import Message
from logbroker.tls import TlsConfig

__all__ = [
    "SaslConfig",
    "TlsConfig",
    "Admin",
    "Consumer",
    "FutureRecordMetadata",
    "FutureRecordsMetadata",
    "GroupDescription",
    "GroupListing",
    "GroupMemberInfo",
    "Message",
    "MetadataCache",
    "PartitionInfo",
    "PartitionLag",
    "Producer",
    "QueueConsumer",
    "QueueMessage",
    "RecordMetadata",
    "Reply",
    "Requester",
    "Responder",
    "TopicDescription",
]
