"""End-to-end encryption of record values, on the clients only: brokers and their disks never see
the plaintext of an encrypted record's value.

A Producer built with `encryption_key_file=` seals each non-null value with AES-256-GCM (the
`cryptography` package) before the record joins a batch; a Consumer or QueueConsumer built with
`encryption_key_file=` opens them as they are handed out. What is and is not protected:

- the value only. Record keys, headers and timestamps stay plaintext (brokers partition and
  compact by key; headers carry routing data such as the delivery headers). A null value (a
  tombstone) stays null (its record carries the key id header all the same: see Cost below).
- A record is sealed for its topic: the AAD binds the topic and the key id, so a value copied into
  another topic, or relabelled with another key id, fails to open, as does any changed byte.

Sealed value layout (the record's value on the wire and on disk)::

    offset  size  field
    0       1     format version, 1
    1       12    nonce: 96 random bits, new for every record (os.urandom)
    13      n     ciphertext of the n-byte plaintext
    13+n    16    GCM tag

The key id travels in the record header KEY_ID_HEADER ("logbroker.enc.kid", ASCII), which also
marks the record as encrypted. AAD = b"logbroker.enc.v1\\0" + topic (UTF-8) + b"\\0" + key id.
Random 96-bit nonces are safe for about 2**32 records per key (NIST SP 800-38D): rotate well before.

Key file (JSON, at most KEY_FILE_BYTES_MAX bytes)::

    {"keys": [{"id": "2026-01", "key": "<base64 of 32 random bytes>"},
              {"id": "2026-02", "key": "..."}],
     "current": "2026-02"}

Ids are 1-64 characters of [A-Za-z0-9._-], unique, at most KEYS_MAX keys. The producer seals with
`current` (or, without it, the last key listed: the newest); consumers open with any key of the
file. Rotation: add the new key to the consumers' files, then make it current in the producers',
and drop the old key once no record sealed with it is still read. A bad file (unreadable, not JSON,
a key not 32 bytes, a duplicate or malformed id, an unknown `current`) raises EncryptionKeyError
naming the file and the problem, never a key's bytes. `logbroker keygen`-like: any 32 random bytes,
e.g. `python -c "import base64,os; print(base64.b64encode(os.urandom(32)).decode())"`.

A record that cannot be opened (no key file configured, a key id the file lacks, a wrong key, a
tampered or moved value) is still handed out, in order, with its `value` replaced by a
`DecryptionError` (topic, partition, offset, key id and reason; never bytes of the value), so the
records after it flow and its offset can be committed or the message settled, as a consumer of a
poison message expects; check `isinstance(m.value, DecryptionError)` where that can happen. A warning
is logged, rate-limited per topic. An opened record loses its KEY_ID_HEADER: the consumer sees the
record as it was produced.

Cost: a producer without a key file does no work per record for this (one attribute test per
send()). A consumer, with or without a key file, looks at each decoded batch's first record: only
when it has headers are the batch's header names searched for the key id header (C-level passes),
and only a batch holding it is walked record by record. So that this per-batch test finds every
sealed record, an encrypting producer marks every record it sends with the key id header, a null
value too (one producer builds each batch, and compaction keeps a batch's records together).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from logbroker.errors import LogbrokerError
from logbroker.log_throttle import LogThrottle
from logbroker.storage.record_batch import Message, RecordHeaders

log = logging.getLogger(__name__)

KEY_ID_HEADER = "logbroker.enc.kid"
FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32  # AES-256
SEAL_OVERHEAD_BYTES = 1 + NONCE_BYTES + TAG_BYTES
KEY_FILE_BYTES_MAX = 1 << 20
KEYS_MAX = 1000
KEY_ID_MAX_CHARS = 64
_KEY_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{KEY_ID_MAX_CHARS}}}")
_AAD_PREFIX = b"logbroker.enc.v1\0"


class EncryptionKeyError(LogbrokerError):
    """A key file that cannot be used (the message names the file and the problem, not key bytes)."""


class DecryptionError(LogbrokerError):
    """Stands in for the value of one record that could not be opened (see the module doc)."""

    def __init__(self, topic: str, partition: int, offset: int, key_id: str, reason: str) -> None:
        super().__init__(f"record {topic}-{partition}@{offset} (key id {key_id!r}) cannot be decrypted: {reason}")
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key_id = key_id
        self.reason = reason


# -- pure functions ------------------------------------------------------------------------------


def aad(topic: str, key_id: str) -> bytes:
    return _AAD_PREFIX + topic.encode("utf-8") + b"\0" + key_id.encode("ascii")


def seal(key: bytes, key_id: str, topic: str, plaintext: bytes, nonce: bytes) -> bytes:
    """The sealed value (layout above) of `plaintext` for `topic`."""
    return bytes((FORMAT_VERSION,)) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad(topic, key_id))


def open_sealed(key: bytes, key_id: str, topic: str, sealed: bytes) -> bytes:
    """The plaintext of a sealed value; ValueError with the reason when it does not open."""
    return open_with(AESGCM(key), key_id, topic, sealed)


@dataclass(frozen=True)
class KeyRing:
    """The keys of one key file: id -> 32 bytes, and the id producers seal with."""

    keys: dict[str, bytes] = field(repr=False)
    current: str

    def __repr__(self) -> str:  # never the key bytes
        return f"KeyRing(ids={sorted(self.keys)}, current={self.current!r})"


def parse_key_file(text: str | bytes, source: str = "key file") -> KeyRing:
    """The KeyRing of a key file's contents (format above); EncryptionKeyError naming `source`."""
    def bad(problem: str) -> EncryptionKeyError:
        return EncryptionKeyError(f"encryption key file {source}: {problem}")

    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({type(exc).__name__} at {getattr(exc, 'pos', '?')})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        raise bad('expected {"keys": [{"id": ..., "key": base64 of 32 bytes}, ...], "current": id}')
    if len(doc["keys"]) > KEYS_MAX:
        raise bad(f"{len(doc['keys'])} keys, at most {KEYS_MAX}")
    keys: dict[str, bytes] = {}
    for i, entry in enumerate(doc["keys"]):
        kid = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or _KEY_ID.fullmatch(kid) is None:
            raise bad(f"keys[{i}]: id must be 1-{KEY_ID_MAX_CHARS} characters of [A-Za-z0-9._-]")
        if kid in keys:
            raise bad(f"keys[{i}]: duplicate id {kid!r}")
        raw = entry.get("key")
        try:
            key = base64.b64decode(raw, validate=True) if isinstance(raw, str) else None
        except (binascii.Error, ValueError):
            key = None
        if key is None:
            raise bad(f"key {kid!r}: not base64 text")
        if len(key) != KEY_BYTES:
            raise bad(f"key {kid!r}: {len(key)} bytes, AES-256 needs {KEY_BYTES}")
        keys[kid] = key
    current = doc.get("current", list(keys)[-1])
    if current not in keys:
        raise bad(f"current {current!r} is not one of the key ids")
    return KeyRing(keys, current)


def load_key_file(path: str | os.PathLike[str]) -> KeyRing:
    """The KeyRing in the file at `path`; EncryptionKeyError if missing, unreadable, too big or bad."""
    try:
        with open(path, "rb") as f:
            data = f.read(KEY_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise EncryptionKeyError(f"encryption key file {os.fspath(path)}: {exc.strerror or exc}") from None
    if len(data) > KEY_FILE_BYTES_MAX:
        raise EncryptionKeyError(f"encryption key file {os.fspath(path)}: larger than {KEY_FILE_BYTES_MAX} bytes")
    return parse_key_file(data, os.fspath(path))


# -- the clients' side ---------------------------------------------------------------------------

Headers = Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None


class Sealer:
    """A producer's: seals values with one key of a KeyRing."""

    def __init__(self, ring: KeyRing, key_id: str | None = None, urandom: Callable[[int], bytes] = os.urandom) -> None:
        self.key_id = ring.current if key_id is None else key_id
        if self.key_id not in ring.keys:
            raise EncryptionKeyError(f"encryption key id {self.key_id!r} is not in the key file")
        self._aead = AESGCM(ring.keys[self.key_id])
        self._header = (KEY_ID_HEADER, self.key_id.encode("ascii"))
        self._urandom = urandom

    def value(self, topic: str, plaintext: bytes | None) -> bytes | None:
        """The sealed value (None stays None)."""
        if plaintext is None:
            return None
        nonce = self._urandom(NONCE_BYTES)
        return bytes((FORMAT_VERSION,)) + nonce + self._aead.encrypt(nonce, plaintext, aad(topic, self.key_id))

    def headers(self, headers: Headers) -> list[tuple[str, bytes | str | None]]:
        """`headers` with the key id header added; ValueError if they already carry one."""
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
        if any(k == KEY_ID_HEADER for k, _ in items):
            raise ValueError(f"header {KEY_ID_HEADER!r} is reserved for encryption")
        items.append(self._header)
        return items


_headers_of = itemgetter(5)  # Message.headers
_name_of = itemgetter(0)  # a header's name


class Opener:
    """A consumer's: opens sealed values with a KeyRing (None: no key file, every sealed record fails)."""

    def __init__(self, ring: KeyRing | None) -> None:
        self._aeads = {} if ring is None else {kid: AESGCM(k) for kid, k in ring.keys.items()}
        self._configured = ring is not None
        self._warn = LogThrottle()

    def messages(self, out: list[Message]) -> list[Message]:
        """`out` with every sealed record opened (or its value a DecryptionError)."""
        if not any(map(_headers_of, out)):  # the common case: no record has headers
            return out
        if KEY_ID_HEADER not in map(_name_of, chain.from_iterable(map(_headers_of, out))):  # C-level passes
            return out
        result = []
        for m in out:
            if m.headers:
                opened = self.record(m.topic, m.partition, m.offset, m.value, m.headers)
                if opened is not None:
                    m = m._replace(value=opened[0], headers=opened[1])  # type: ignore[arg-type]  # documented
            result.append(m)
        return result

    def record(self, topic: str, partition: int, offset: int, value: bytes | None,
               headers: RecordHeaders) -> tuple[bytes | DecryptionError | None, RecordHeaders] | None:
        """(plaintext or DecryptionError, headers without the key id header) of a sealed record
        (a null value stays None); None for a record without the key id header."""
        kid_raw = None
        for k, v in headers:
            if k == KEY_ID_HEADER:
                kid_raw = v
                break
        else:
            return None
        if value is None:
            return None, tuple(h for h in headers if h[0] != KEY_ID_HEADER)
        kid = (kid_raw or b"").decode("ascii", "replace")
        aead = self._aeads.get(kid)
        if aead is None:
            reason = ("no encryption key configured (encryption_key_file)" if not self._configured
                      else "key id not in the key file")
            return self._failed(topic, partition, offset, kid, reason), headers
        try:
            plain = open_with(aead, kid, topic, value)
        except ValueError as exc:
            return self._failed(topic, partition, offset, kid, str(exc)), headers
        return plain, tuple(h for h in headers if h[0] != KEY_ID_HEADER)

    def _failed(self, topic: str, partition: int, offset: int, kid: str, reason: str) -> DecryptionError:
        err = DecryptionError(topic, partition, offset, kid, reason)
        count = self._warn.event(topic)
        if count:
            log.warning("%s (%d such record(s) of topic %r since the last warning)", err, count, topic)
        return err


def open_with(aead: Any, key_id: str, topic: str, sealed: bytes) -> bytes:
    """open_sealed() with a ready AESGCM."""
    if len(sealed) < SEAL_OVERHEAD_BYTES:
        raise ValueError(f"value of {len(sealed)} bytes is shorter than a sealed value ({SEAL_OVERHEAD_BYTES})")
    if sealed[0] != FORMAT_VERSION:
        raise ValueError(f"unknown sealed-value format {sealed[0]}")
    try:
        plain: bytes = aead.decrypt(sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :], aad(topic, key_id))
        return plain
    except InvalidTag:
        raise ValueError("authentication failed (wrong key, changed bytes, or a value moved from another "
                         "topic)") from None
