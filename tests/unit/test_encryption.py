"""client/encryption.py, the pure part: sealing round trips, what refuses to open (a changed byte,
another topic, another key id), key rotation, key-file validation, and the consumer's per-record
errors; plus the client id rule (logbroker/client_id.py)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from logbroker.client.encryption import (
    KEY_ID_HEADER,
    NONCE_BYTES,
    SEAL_OVERHEAD_BYTES,
    DecryptionError,
    EncryptionKeyError,
    KeyRing,
    Opener,
    Sealer,
    load_key_file,
    open_sealed,
    parse_key_file,
    seal,
)
from logbroker.client_id import CLIENT_ID_MAX_CHARS, DEFAULT_CLIENT_ID, checked_client_id, client_id_problem
from logbroker.storage.record_batch import Message

K1 = bytes(range(32))
K2 = bytes(range(100, 132))


def _file(keys: list[tuple[str, bytes]], current: str | None = None) -> str:
    doc: dict[str, object] = {"keys": [{"id": i, "key": base64.b64encode(k).decode()} for i, k in keys]}
    if current is not None:
        doc["current"] = current
    return json.dumps(doc)


def test_round_trip_and_layout():
    nonce = b"\x01" * NONCE_BYTES
    sealed = seal(K1, "k1", "orders", b"card 4111", nonce)
    assert len(sealed) == len(b"card 4111") + SEAL_OVERHEAD_BYTES
    assert sealed[0] == 1 and sealed[1 : 1 + NONCE_BYTES] == nonce and b"card" not in sealed
    assert open_sealed(K1, "k1", "orders", sealed) == b"card 4111"
    assert open_sealed(K1, "k1", "orders", seal(K1, "k1", "orders", b"", nonce)) == b""


def test_a_changed_byte_another_topic_or_key_id_or_key_is_refused():
    sealed = seal(K1, "k1", "orders", b"secret", os.urandom(NONCE_BYTES))
    for i in range(1, len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(ValueError, match="authentication failed"):
            open_sealed(K1, "k1", "orders", bytes(tampered))
    with pytest.raises(ValueError, match="another topic"):
        open_sealed(K1, "k1", "payments", sealed)  # moved to another topic: the AAD differs
    with pytest.raises(ValueError, match="authentication failed"):
        open_sealed(K1, "k2", "orders", sealed)  # relabelled with another key id
    with pytest.raises(ValueError, match="authentication failed"):
        open_sealed(K2, "k1", "orders", sealed)
    with pytest.raises(ValueError, match="format"):
        open_sealed(K1, "k1", "orders", b"\x02" + sealed[1:])
    with pytest.raises(ValueError, match="shorter"):
        open_sealed(K1, "k1", "orders", sealed[:SEAL_OVERHEAD_BYTES - 1])


def test_every_record_gets_a_new_nonce():
    sealer = Sealer(KeyRing({"k1": K1}, "k1"))
    values = [sealer.value("t", b"same") for _ in range(100)]
    assert len({v[1 : 1 + NONCE_BYTES] for v in values}) == 100


def _msg(value: bytes | None, headers: tuple = (), topic: str = "t", offset: int = 0) -> Message:
    return Message(topic, 0, offset, b"key", value, headers, 0)


def _sealed_msg(sealer: Sealer, plain: bytes, topic: str = "t", offset: int = 0, extra: tuple = ()) -> Message:
    headers = tuple((k, v if isinstance(v, bytes) else str(v).encode()) for k, v in sealer.headers(extra))
    return _msg(sealer.value(topic, plain), headers, topic, offset)


def test_rotation_producer_seals_with_current_consumer_opens_old_and_new():
    old = parse_key_file(_file([("2026-01", K1)]))
    rotated = parse_key_file(_file([("2026-01", K1), ("2026-02", K2)]))
    assert rotated.current == "2026-02"  # without "current": the last key listed, the newest
    before, after = Sealer(old), Sealer(rotated)
    assert (before.key_id, after.key_id) == ("2026-01", "2026-02")
    named = Sealer(rotated, "2026-01")
    msgs = [_sealed_msg(before, b"a", offset=0), _sealed_msg(after, b"b", offset=1),
            _sealed_msg(named, b"c", offset=2)]
    out = Opener(rotated).messages(msgs)
    assert [m.value for m in out] == [b"a", b"b", b"c"]
    assert all(m.headers == () for m in out)  # the key id header is gone once opened
    # a consumer still on the old file: the new key's record is a clear error, the others flow
    out = Opener(old).messages(msgs)
    assert out[0].value == b"a" and out[2].value == b"c"
    err = out[1].value
    assert isinstance(err, DecryptionError)
    assert (err.topic, err.partition, err.offset, err.key_id) == ("t", 0, 1, "2026-02")
    assert "not in the key file" in str(err)
    assert dict(out[1].headers)[KEY_ID_HEADER] == b"2026-02"
    with pytest.raises(EncryptionKeyError, match="not in the key file"):
        Sealer(old, "2026-02")


def test_opener_without_a_key_gives_errors_and_leaves_plain_records_alone():
    sealer = Sealer(KeyRing({"k1": K1}, "k1"))
    plain = [_msg(b"p0"), _msg(None)]
    assert Opener(None).messages(plain) is plain  # no headers at all: the list itself, untouched
    with_headers = [_msg(b"p1", (("h", b"v"),))]
    assert Opener(None).messages(with_headers) == with_headers
    msgs = [_msg(b"p0"), _sealed_msg(sealer, b"s1", offset=1, extra=[("h", b"v")]), _msg(b"p2", offset=2)]
    out = Opener(None).messages(msgs)
    assert out[0].value == b"p0" and out[2].value == b"p2"
    assert isinstance(out[1].value, DecryptionError) and "no encryption key configured" in str(out[1].value)
    opened = Opener(KeyRing({"k1": K1}, "k1")).messages(msgs)
    assert opened[1].value == b"s1" and opened[1].headers == (("h", b"v"),)
    # the record moved to another topic, or with a wrong key under the same id
    moved = msgs[1]._replace(topic="other")
    assert "another topic" in str(Opener(KeyRing({"k1": K1}, "k1")).messages([moved])[0].value)
    assert isinstance(Opener(KeyRing({"k1": K2}, "k1")).messages([msgs[1]])[0].value, DecryptionError)


def test_sealer_refuses_a_reserved_header_and_keeps_others():
    sealer = Sealer(KeyRing({"k1": K1}, "k1"))
    assert sealer.value("t", None) is None  # a tombstone stays null (its record is still marked)
    marked = _msg(None, ((KEY_ID_HEADER, b"k1"), ("h", b"v")))
    assert Opener(None).messages([marked])[0] == _msg(None, (("h", b"v"),))
    assert sealer.headers({"a": b"1"}) == [("a", b"1"), (KEY_ID_HEADER, b"k1")]
    assert sealer.headers(None) == [(KEY_ID_HEADER, b"k1")]
    with pytest.raises(ValueError, match="reserved"):
        sealer.headers([(KEY_ID_HEADER, b"x")])


@pytest.mark.parametrize(("text", "problem"), [
    ("not json", "not JSON"),
    ("[]", "expected"),
    ('{"keys": []}', "expected"),
    (_file([("k1", K1[:31])]), "31 bytes, AES-256 needs 32"),
    (_file([("k1", K1 + b"x")]), "33 bytes"),
    (_file([("bad id!", K1)]), "id must be"),
    (_file([("k1", K1), ("k1", K2)]), "duplicate id"),
    (_file([("k1", K1)], current="k9"), "current 'k9'"),
    ('{"keys": [{"id": "k1", "key": "@@@"}]}', "not base64"),
    ('{"keys": [{"id": "k1", "key": 5}]}', "not base64"),
])
def test_bad_key_files_are_refused_clearly_without_key_bytes(text, problem):
    with pytest.raises(EncryptionKeyError, match="encryption key file") as e:
        parse_key_file(text, "/etc/keys.json")
    assert problem in str(e.value) and "/etc/keys.json" in str(e.value)
    for key in (K1, K1[:31], K1 + b"x"):
        assert base64.b64encode(key).decode() not in str(e.value)


def test_load_key_file_missing_unreadable_too_big(tmp_path):
    with pytest.raises(EncryptionKeyError, match="No such file"):
        load_key_file(tmp_path / "absent.json")
    with pytest.raises(EncryptionKeyError, match="directory"):
        load_key_file(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(EncryptionKeyError, match="larger than"):
        load_key_file(big)
    good = tmp_path / "keys.json"
    good.write_text(_file([("k1", K1)]))
    ring = load_key_file(good)
    assert ring.keys == {"k1": K1} and base64.b64encode(K1).decode() not in repr(ring) and str(K1) not in repr(ring)


def test_client_id_rule():
    assert checked_client_id(DEFAULT_CLIENT_ID) == "logbroker-python"
    assert client_id_problem("billing.worker-7_a") is None
    assert client_id_problem("x" * CLIENT_ID_MAX_CHARS) is None
    for bad in ("", "x" * (CLIENT_ID_MAX_CHARS + 1), "has space", "naïve", "a\nb", "a/b", 5):
        assert client_id_problem(bad) is not None, bad
        with pytest.raises(ValueError, match="client id"):
            checked_client_id(bad)
    assert len(client_id_problem("y" * 10_000) or "") < 200  # a hostile value is not echoed whole
