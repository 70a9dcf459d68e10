"""One partition replica hosted by this broker: its log, leader epoch and high watermark.

A standalone broker leads every partition and its ISR is itself, so the high watermark follows the
log end offset on every append. Replication (followers, ISR, acks=all waits) extends this class.
"""

from __future__ import annotations

from logbroker.storage.log import AppendResult, Log


class Partition:
    def __init__(self, topic: str, index: int, log: Log, broker_id: int, leader_epoch: int = 0) -> None:
        self.topic = topic
        self.index = index
        self.log = log
        self.leader_epoch = leader_epoch
        self.replicas = [broker_id]
        self.isr = [broker_id]
        self.leader = broker_id

    @property
    def high_watermark(self) -> int:
        return self.log.high_watermark

    def append_as_leader(self, records: bytes) -> AppendResult:
        result = self.log.append(records, self.leader_epoch)
        self.log.high_watermark = self.log.log_end_offset  # ISR == [self]
        return result

    def read(self, offset: int, max_bytes: int) -> memoryview:
        """Whole batches from `offset`, never past the high watermark; valid until the next append."""
        return self.log.read(offset, max_bytes, self.log.high_watermark)
