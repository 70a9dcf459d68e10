"""Queues: the client of share groups (KIP-932 semantics). `QueueConsumer` is a member; each record
it is handed is its own until it settles it (`QueueMessage.ack` / `release` / `reject`)."""

from logbroker.client.queue.message import MessageAlreadySettledError, QueueMessage
from logbroker.client.queue.queue_consumer import QueueConsumer, share_settings

__all__ = ["MessageAlreadySettledError", "QueueConsumer", "QueueMessage", "share_settings"]
