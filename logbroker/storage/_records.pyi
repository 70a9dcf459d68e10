# logbroker.storage._records, the C record decoder (_records.c)
from typing import Any

def decode_records(
    buf: bytes | bytearray | memoryview, pos: int, size: int, topic: str, partition: int, skip: int, message_cls: type, /
) -> list[Any] | None: ...
