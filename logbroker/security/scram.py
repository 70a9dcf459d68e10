"""SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677): the stored credential, and the server's
and the client's side of one exchange as pure state machines (no I/O, no clock; the nonce source
is injectable for tests).

One exchange, as RFC 5802 section 3 has it (no channel binding: gs2 header ``n,,``)::

    client-first   n,,n=<user>,r=<client nonce>
    server-first   r=<client nonce><server nonce>,s=<base64 salt>,i=<iterations>
    client-final   c=biws,r=<client nonce><server nonce>,p=<base64 ClientProof>
    server-final   v=<base64 ServerSignature>          or   e=<error>

    SaltedPassword  = PBKDF2-HMAC-H(password, salt, iterations)
    ClientKey       = HMAC(SaltedPassword, "Client Key")    StoredKey = H(ClientKey)
    ServerKey       = HMAC(SaltedPassword, "Server Key")
    AuthMessage     = client-first-bare "," server-first "," client-final-without-proof
    ClientProof     = ClientKey XOR HMAC(StoredKey, AuthMessage)
    ServerSignature = HMAC(ServerKey, AuthMessage)

The server keeps only (salt, iterations, StoredKey, ServerKey): never the password nor anything
that logs in by itself. It checks, in this order, refusing with a `ScramError` whose message names
the rule and never a secret:

- every message within `MAX_MESSAGE_BYTES`, UTF-8, attributes in the RFC's order, no mandatory
  extension (``m=``), a user name with only the ``=2C``/``=3D`` escapes;
- the client-final's nonce equals the combined nonce the server sent, byte for byte (RFC 5802
  section 5.1: a client-final from another exchange, replayed, carries another nonce — the check
  CVE-2024-56128 found skipped), and its channel binding is the gs2 header the client first sent;
- the proof, by recomputing StoredKey from it and comparing in constant time (`hmac.compare_digest`).

An unknown user goes through the same steps with a made-up credential (derived from the user name
and a server secret), so the answer and its timing do not say whether the user exists.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

MAX_MESSAGE_BYTES = 1024
MAX_USER_CHARS = 256
MIN_ITERATIONS = 4096
MAX_ITERATIONS = 1 << 20
DEFAULT_ITERATIONS = 4096
NONCE_BYTES = 24


class ScramError(Exception):
    """A SCRAM exchange refused; the message is safe to log and to send (no secret in it)."""


class Mechanism(Enum):
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"

    @property
    def hash_name(self) -> str:
        return "sha256" if self is Mechanism.SCRAM_SHA_256 else "sha512"

    @classmethod
    def parse(cls, name: str) -> Mechanism:
        for m in cls:
            if m.value == name.upper():
                return m
        raise ScramError(f"unknown SASL mechanism {name[:40]!r}: SCRAM-SHA-256 or SCRAM-SHA-512")


@dataclass(frozen=True)
class ScramCredential:
    """What the metadata store keeps for one user and mechanism (`to_json` / `from_json`)."""

    mechanism: Mechanism
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def to_json(self) -> dict[str, object]:
        b64 = base64.b64encode
        return {"mechanism": self.mechanism.value, "salt": b64(self.salt).decode(), "iterations": self.iterations,
                "stored_key": b64(self.stored_key).decode(), "server_key": b64(self.server_key).decode()}

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> ScramCredential:
        try:
            iterations = int(str(obj["iterations"]))
            cred = cls(Mechanism.parse(str(obj["mechanism"])), _b64(str(obj["salt"])), iterations,
                       _b64(str(obj["stored_key"])), _b64(str(obj["server_key"])))
        except (KeyError, ValueError) as e:
            raise ScramError(f"malformed stored credential: {type(e).__name__}") from None
        return cred.validated()

    def validated(self) -> ScramCredential:
        """Itself, if its iteration count, salt and key sizes are usable; else ScramError."""
        if not MIN_ITERATIONS <= self.iterations <= MAX_ITERATIONS:
            raise ScramError(f"credential has {self.iterations} iterations, outside {MIN_ITERATIONS}..{MAX_ITERATIONS}")
        if not 16 <= len(self.salt) <= 64:
            raise ScramError(f"credential salt of {len(self.salt)} bytes: 16..64 expected")
        size = hashlib.new(self.mechanism.hash_name).digest_size
        if len(self.stored_key) != size or len(self.server_key) != size:
            raise ScramError(f"credential keys must be {size} bytes for {self.mechanism.value}")
        return self


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ScramError("malformed base64") from None


def _hmac(mech: Mechanism, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, mech.hash_name).digest()


def _h(mech: Mechanism, data: bytes) -> bytes:
    return hashlib.new(mech.hash_name, data).digest()


def salted_password(mech: Mechanism, password: str, salt: bytes, iterations: int) -> bytes:
    # RFC 5802's Hi() is PBKDF2 with HMAC-H; SASLprep of the password is left out (ASCII passwords
    # are unchanged by it; others are used as their UTF-8 bytes, on both sides alike).
    return hashlib.pbkdf2_hmac(mech.hash_name, password.encode("utf-8"), salt, iterations)


def make_credential(mech: Mechanism, password: str, iterations: int = DEFAULT_ITERATIONS,
                    salt: bytes | None = None) -> ScramCredential:
    """A new credential for `password`, with a random 32-byte salt unless one is given."""
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ScramError(f"iterations must be in {MIN_ITERATIONS}..{MAX_ITERATIONS}, not {iterations}")
    if not password:
        raise ScramError("the password is empty")
    salt = secrets.token_bytes(32) if salt is None else salt
    sp = salted_password(mech, password, salt, iterations)
    return ScramCredential(mech, salt, iterations, _h(mech, _hmac(mech, sp, b"Client Key")),
                           _hmac(mech, sp, b"Server Key"))


def _attributes(message: str, names: str) -> list[str]:
    """The values of `message`'s comma-separated attributes, which must be exactly `names` in order
    (one letter each), e.g. ("r=abc,s=xyz", "rs") -> ["abc", "xyz"]."""
    parts = message.split(",")
    if len(parts) != len(names) or any(len(p) < 2 or p[0] != n or p[1] != "=" for p, n in zip(parts, names, strict=False)):
        raise ScramError(f"malformed SCRAM message: expected attributes {','.join(names)} in that order")
    return [p[2:] for p in parts]


def _decode_message(data: bytes) -> str:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ScramError(f"SCRAM message of {len(data)} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("SCRAM message is not UTF-8") from None


def _unescape_user(name: str) -> str:
    if not name or len(name) > MAX_USER_CHARS:
        raise ScramError(f"user name must be 1..{MAX_USER_CHARS} characters")
    out = name.replace("=2C", ",").replace("=3D", "=")
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise ScramError("user name has an '=' that is not the escape =2C or =3D")
    return out


def escape_user(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _valid_nonce(nonce: str) -> bool:
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


class ServerExchange:
    """The server's side of one exchange: `first(client_first) -> server_first`, then
    `final(client_final) -> server_final`; `user` is set once the client-first parsed, and
    `authenticated` only after a good proof. `lookup` answers a user's credential or None.
    Any error ends the exchange (a second call raises)."""

    def __init__(self, mech: Mechanism, lookup: Callable[[str], ScramCredential | None], fake_key: bytes,
                 nonce: Callable[[], str] | None = None) -> None:
        self.mech = mech
        self._lookup = lookup
        self._fake_key = fake_key
        self._nonce = nonce or (lambda: secrets.token_urlsafe(NONCE_BYTES))
        self.user: str | None = None
        self.authenticated = False
        self._state = "first"
        self._cred: ScramCredential | None = None
        self._known = False
        self._gs2 = ""
        self._nonce_sent = ""
        self._first_bare = ""
        self._server_first = ""

    def _step(self, expected: str) -> None:
        state, self._state = self._state, "failed"  # until the step succeeds; an error ends the exchange
        if state != expected:
            raise ScramError(f"SCRAM message out of order (exchange is at {state!r})")

    def first(self, data: bytes) -> bytes:
        self._step("first")
        text = _decode_message(data)
        gs2, sep, bare = text.partition(",,")  # "n,," or "y,,": no authzid
        if not sep or gs2 not in ("n", "y"):
            raise ScramError("unsupported gs2 header: channel binding and authzid are not supported")
        if bare.startswith("m="):
            raise ScramError("mandatory SCRAM extension not supported")
        user_esc, client_nonce = _attributes(bare, "nr")  # extensions after r= are refused here
        if not _valid_nonce(client_nonce):
            raise ScramError("malformed client nonce")
        user = _unescape_user(user_esc)
        cred = self._lookup(user)
        self._known = cred is not None and cred.mechanism is self.mech
        self._cred = cred if cred is not None and self._known else self._fake(user)
        self.user, self._gs2, self._first_bare = user, gs2 + ",,", bare
        self._nonce_sent = client_nonce + self._nonce()
        salt = base64.b64encode(self._cred.salt).decode()
        self._server_first = f"r={self._nonce_sent},s={salt},i={self._cred.iterations}"
        self._state = "final"
        return self._server_first.encode()

    def _fake(self, user: str) -> ScramCredential:
        seed = _hmac(self.mech, self._fake_key, user.encode("utf-8"))
        return ScramCredential(self.mech, seed[:32], DEFAULT_ITERATIONS, _h(self.mech, seed), seed)

    def final(self, data: bytes) -> bytes:
        self._step("final")
        text = _decode_message(data)
        channel, nonce, proof_b64 = _attributes(text, "crp")
        if not hmac.compare_digest(nonce.encode(), self._nonce_sent.encode()):
            raise ScramError("client-final nonce does not match this exchange's nonce")
        if _b64(channel) != self._gs2.encode():
            raise ScramError("channel binding does not match the gs2 header of the client-first message")
        cred = self._cred
        assert cred is not None
        proof = _b64(proof_b64)
        without_proof = text[: text.rindex(",p=")]
        auth = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.mech, cred.stored_key, auth)
        if len(proof) != len(signature):
            raise ScramError("authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        good = hmac.compare_digest(_h(self.mech, client_key), cred.stored_key)
        if not (good and self._known):
            raise ScramError("authentication failed")
        self.authenticated = True
        self._state = "done"
        return b"v=" + base64.b64encode(_hmac(self.mech, cred.server_key, auth))


class ClientExchange:
    """The client's side: `first() -> client_first`, `final(server_first) -> client_final`,
    `verify(server_final)` (raises unless the server proved it knows the credential)."""

    def __init__(self, mech: Mechanism, user: str, password: str, nonce: Callable[[], str] | None = None) -> None:
        self.mech = mech
        self._user = user
        self._password = password
        self._client_nonce = (nonce or (lambda: secrets.token_urlsafe(NONCE_BYTES)))()
        self._first_bare = f"n={escape_user(user)},r={self._client_nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self._first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        text = _decode_message(server_first)
        nonce, salt_b64, iter_text = _attributes(text, "rsi")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise ScramError("server nonce does not extend the client nonce")
        try:
            iterations = int(iter_text)
        except ValueError:
            raise ScramError("malformed iteration count") from None
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ScramError(f"server asks for {iterations} iterations, outside {MIN_ITERATIONS}..{MAX_ITERATIONS}")
        sp = salted_password(self.mech, self._password, _b64(salt_b64), iterations)
        client_key = _hmac(self.mech, sp, b"Client Key")
        without_proof = f"c=biws,r={nonce}"
        auth = f"{self._first_bare},{text},{without_proof}".encode()
        signature = _hmac(self.mech, _h(self.mech, client_key), auth)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(self.mech, _hmac(self.mech, sp, b"Server Key"), auth)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        text = _decode_message(server_final)
        if text.startswith("e="):
            raise ScramError(f"server refused: {text[2:80]}")
        (sig,) = _attributes(text, "v")
        if not self._server_signature or not hmac.compare_digest(_b64(sig), self._server_signature):
            raise ScramError("server signature does not verify: not the server that holds the credential")
