"""Rewriting closed segments for compaction, and the crash-safe swap (Kafka's Cleaner.cleanInto
and replaceSegments). The decisions are compaction.py's; this module reads and writes files.

Batches. A batch keeps its header fields: baseOffset, lastOffsetDelta, baseTimestamp,
maxTimestamp, partitionLeaderEpoch, producerId/Epoch, baseSequence, attributes; only the
surviving records' bytes are copied (unchanged, so their offset and timestamp deltas still hold),
and batchLength, recordCount and the CRC are recomputed. So recordCount may be below
lastOffsetDelta + 1 (gaps inside a batch), as in Kafka. A batch left with no record is dropped
(Kafka keeps an empty batch for the last sequence of a live producer; this broker keeps no
producer state across batches, so there is nothing it would protect). A gzip batch is rewritten
uncompressed (its compression bits cleared); a batch this module cannot decode (another codec),
and control batches, are kept whole.

Files and the swap, one segment at a time (a cleaned segment keeps its file name, the base offset
of the original, even when its first batch now starts later)::

    1. <base>.log.cleaned   written and fsynced, with the original's modification time
       (compaction.py's tombstone rule reads it), then the directory fsynced
    2. the segment's offset-index entries are deleted (a lookup then walks from the segment's
       first byte: slower, never wrong, whichever file is in place)
    3. rename <base>.log.cleaned -> <base>.log.swap, fsync the directory
    4. rename <base>.log.swap -> <base>.log (replacing the old file atomically), fsync the dir
    5. the segment's offset-index entries are rebuilt from the new file

Recovery (`recover_cleaning`, run by the loader before it lists the segments): a `.cleaned` file
is deleted (the old segment is intact: step 3 never happened); a `.swap` file completes step 4
(the old segment is replaced). A crash after step 4 leaves the new file and no index entries for
it, which is consistent (and recovery rebuilds index entries of any segment it walks).

`CRASH_ENV` (tests only) names a step at which the cleaning process exits at once with
`os._exit(CRASH_EXIT_CODE)`: before_swap (after 2), between_renames (after 3), after_swap
(after 4), so a test can kill a real broker in the middle of a clean (no close, no flush: what
is on disk is what a kill -9 there would leave). log_cleaner.LogCleaner reads it once, when
built; unset, there is no hook at all.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from logbroker.errors import CorruptMessageError, StorageError
from logbroker.storage.atomic_file import fsync_dir
from logbroker.storage.compaction import OffsetMap, keep_records
from logbroker.storage.io_throttle import Throttle
from logbroker.storage.record_batch import (
    COMPRESSION_GZIP,
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    CONTROL_MASK,
    CRC_START,
    HEADER_SIZE,
    LOG_OVERHEAD,
    BatchHeader,
    crc32c,
    decode_varint,
    iter_batches,
)
from logbroker.storage.segment import SUFFIX

log = logging.getLogger(__name__)

CLEANED_SUFFIX = SUFFIX + ".cleaned"
SWAP_SUFFIX = SUFFIX + ".swap"
CRASH_ENV = "LOGBROKER_TEST_CLEANER_CRASH_AT"
CRASH_EXIT_CODE = 86
STEPS = ("before_swap", "between_renames", "after_swap")

Hook = Callable[[str], None]


def crash_hook_from_env(environ: Mapping[str, str] | None = None) -> Hook | None:
    """The hook of `CRASH_ENV` (tests only): exit the process at the named step; None when the
    variable is unset or empty. Raises ValueError for a name that is not one of `STEPS`."""
    target = (os.environ if environ is None else environ).get(CRASH_ENV, "")
    if not target:
        return None
    if target not in STEPS:
        raise ValueError(f"{CRASH_ENV}={target!r}: not one of {', '.join(STEPS)}")

    def hook(step: str) -> None:
        if step == target:
            log.error("%s=%s: exiting in the middle of a clean", CRASH_ENV, step)
            os._exit(CRASH_EXIT_CODE)

    return hook


def _no_hook(step: str) -> None:
    pass


_ZIGZAG_ONE = tuple((b >> 1) ^ -(b & 1) for b in range(0x80))  # one-byte zigzag varints, decoded
TOMBSTONE_VALUE_LENGTH = 0x01  # a value length of -1 (null), zigzag-encoded: one byte

# One record as the cleaner sees it: (start, end) of its bytes in the (decompressed) body, its
# offset, its key (None: no key), and whether it is a tombstone (null value).
RawRecord = tuple[int, int, int, "bytes | None", bool]


def batch_body(buf: bytes | memoryview, pos: int, h: BatchHeader) -> bytes | None:
    """The records' bytes of the batch at `pos` (decompressed), or None if it cannot be read here."""
    body = bytes(buf[pos + HEADER_SIZE : pos + h.batch_length + LOG_OVERHEAD])
    codec = h.attributes & COMPRESSION_MASK
    if codec == COMPRESSION_NONE:
        return body
    if codec == COMPRESSION_GZIP:
        return zlib.decompress(body, 47)
    return None


def scan_records(body: bytes, h: BatchHeader) -> list[RawRecord]:
    """Every record of a batch body (the cleaner's hot loop: one- and two-byte varints, which are
    the lengths, offset deltas and key lengths of ordinary records, are decoded inline; longer ones
    by decode_varint). Raises CorruptMessageError if the body ends inside a record."""
    zz, base = _ZIGZAG_ONE, h.base_offset
    out: list[RawRecord] = []
    append = out.append
    p = 0
    try:
        for _ in range(h.record_count):
            start = p
            b = body[p]
            if b < 0x80:
                length, p = zz[b], p + 1
            elif body[p + 1] < 0x80:
                z = (b & 0x7F) | (body[p + 1] << 7)
                length, p = (z >> 1) ^ -(z & 1), p + 2
            else:
                length, p = decode_varint(body, p)
            end = p + length
            p += 1  # attributes
            while body[p] >= 0x80:  # timestamp delta: skipped
                p += 1
            b = body[p + 1]
            p += 2
            if b < 0x80:
                od = zz[b]
            elif body[p] < 0x80:
                z = (b & 0x7F) | (body[p] << 7)
                od, p = (z >> 1) ^ -(z & 1), p + 1
            else:
                od, p = decode_varint(body, p - 1)
            b = body[p]
            if b < 0x80:
                kl, p = zz[b], p + 1
            else:
                kl, p = decode_varint(body, p)
            if kl >= 0:
                key = body[p : p + kl]
                p += kl
            else:
                key = None
            append((start, end, base + od, key, body[p] == TOMBSTONE_VALUE_LENGTH))
            p = end
    except IndexError:
        raise CorruptMessageError(f"batch at offset {base}: a record runs past the batch") from None
    return out


def map_segment(buf: bytes | memoryview, offsets: OffsetMap, throttle: Throttle | None = None) -> bool:
    """Add the keys of one segment's batches to `offsets`; False if the map filled up. Each batch
    read is paid for through `throttle` first."""
    for h, pos in iter_batches(buf):
        if throttle is not None:
            throttle.consume(h.batch_length + LOG_OVERHEAD)
        if h.attributes & CONTROL_MASK:
            continue
        body = batch_body(buf, pos, h)
        if body is None:
            continue
        if not offsets.put_records(scan_records(body, h)):
            return False
    return True


def clean_segment(buf: bytes | memoryview, offsets: OffsetMap, tombstones_expired: bool,
                  throttle: Throttle | None = None) -> bytes:
    """The cleaned contents of one segment (see the module doc); each batch read is paid for
    through `throttle` first."""
    out = bytearray()
    for h, pos in iter_batches(buf):
        size = h.batch_length + LOG_OVERHEAD
        if throttle is not None:
            throttle.consume(size)
        body = None if h.attributes & CONTROL_MASK else batch_body(buf, pos, h)
        if body is None:
            out += buf[pos : pos + size]
            continue
        kept = keep_records(scan_records(body, h), offsets, tombstones_expired)
        if not kept:
            continue
        if len(kept) == h.record_count and h.attributes & COMPRESSION_MASK == COMPRESSION_NONE:
            out += buf[pos : pos + size]
            continue
        append_kept(out, buf[pos : pos + HEADER_SIZE], h.attributes, body, kept)
    return bytes(out)


def append_kept(out: bytearray, header: bytes | memoryview, attributes: int, body: bytes | memoryview,
                kept: list[RawRecord]) -> None:
    """Append to `out` the batch whose 61-byte header is `header`, holding only the records of
    `body` (uncompressed) that `kept` names (scan_records' spans): its length, record count and CRC rewritten, its
    compression cleared (offsets and timestamps stay: the deltas still point at the same records)."""
    start = len(out)
    out += header
    for rec in kept:
        out += body[rec[0] : rec[1]]
    struct.pack_into(">i", out, start + 8, len(out) - start - LOG_OVERHEAD)
    struct.pack_into(">h", out, start + 21, attributes & ~COMPRESSION_MASK)
    struct.pack_into(">i", out, start + 57, len(kept))
    struct.pack_into(">I", out, start + 17, crc32c(memoryview(out)[start + CRC_START :]))


def write_cleaned(directory: Path, name: str, data: bytes, mtime_ns: int) -> Path:
    """Step 1: `<name>.cleaned`, fsynced, with the original's modification time."""
    path = directory / (name + ".cleaned")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data) if len(data) < (1 << 30) else _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(path, ns=(mtime_ns, mtime_ns))
        fsync_dir(directory)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e}") from e
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def swap_in(directory: Path, name: str, hook: Hook = _no_hook) -> None:
    """Steps 3 and 4 for the segment file `name` whose `.cleaned` twin is written (step 1) and
    whose index entries are gone (step 2)."""
    cleaned = directory / (name + ".cleaned")
    swap = directory / (name + ".swap")
    try:
        hook("before_swap")
        os.rename(cleaned, swap)
        fsync_dir(directory)
        hook("between_renames")
        os.replace(swap, directory / name)
        fsync_dir(directory)
        hook("after_swap")
    except OSError as e:
        raise StorageError(f"cannot swap in cleaned {directory / name}: {e}") from e


def recover_cleaning(directory: Path) -> list[str]:
    """Finish or undo interrupted swaps (module doc); returns the segment files swapped in."""
    swapped: list[str] = []
    changed = False
    try:
        names = sorted(os.listdir(directory))
        for entry in names:
            if entry.endswith(CLEANED_SUFFIX):
                log.warning("%s: removing %s (a clean interrupted before its swap)", directory, entry)
                os.unlink(directory / entry)
                changed = True
            elif entry.endswith(SWAP_SUFFIX):
                target = entry[: -len(".swap")]
                log.warning("%s: completing the swap of %s (a clean interrupted mid-swap)", directory, target)
                os.replace(directory / entry, directory / target)
                swapped.append(target)
                changed = True
        if changed:
            fsync_dir(directory)
    except OSError as e:
        raise StorageError(f"cannot recover interrupted cleaning in {directory}: {e}") from e
    return swapped
