"""SCRAM exchanges (logbroker/security/scram.py): RFC 7677's test vector, both mechanisms end to end,
and every refusal the issue names (wrong password, replayed or altered client-final, bad nonces)."""

from __future__ import annotations

import base64

import pytest

from logbroker.security.scram import (
    ClientExchange,
    Mechanism,
    ScramCredential,
    ScramError,
    ServerExchange,
    escape_user,
    make_credential,
)

SHA256 = Mechanism.SCRAM_SHA_256
FAKE_KEY = b"k" * 32


def _server(creds: dict[str, ScramCredential], mech: Mechanism = SHA256, nonce: str | None = None) -> ServerExchange:
    return ServerExchange(mech, creds.get, FAKE_KEY, (lambda: nonce) if nonce else None)


def _login(creds: dict[str, ScramCredential], user: str, password: str, mech: Mechanism = SHA256) -> ServerExchange:
    client = ClientExchange(mech, user, password)
    server = _server(creds, mech)
    client_final = client.final(server.first(client.first()))
    client.verify(server.final(client_final))
    return server


def test_rfc7677_test_vector():
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    creds = {"user": make_credential(SHA256, "pencil", 4096, salt)}
    server = _server(creds, nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    client = ClientExchange(SHA256, "user", "pencil", nonce=lambda: "rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = server.first(client.first())
    assert server_first == (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    client_final = client.final(server_first)
    assert client_final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    server_final = server.final(client_final)
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client.verify(server_final)
    assert server.authenticated and server.user == "user"


@pytest.mark.parametrize("mech", list(Mechanism))
def test_good_password_logs_in_with_both_mechanisms(mech):
    creds = {"al,i=ce": make_credential(mech, "s3cret")}
    server = _login(creds, "al,i=ce", "s3cret", mech)
    assert server.authenticated and server.user == "al,i=ce"


def test_wrong_password_is_refused_without_saying_why():
    creds = {"alice": make_credential(SHA256, "right")}
    with pytest.raises(ScramError, match="^authentication failed$"):
        _login(creds, "alice", "wrong")


def test_unknown_user_fails_exactly_like_a_wrong_password():
    creds = {"alice": make_credential(SHA256, "right")}
    server = _server(creds)
    first = server.first(ClientExchange(SHA256, "mallory", "x").first())
    # a made-up but stable salt: asking twice gives the same one, so probing learns nothing
    assert first.split(b",")[1] == _server(creds).first(ClientExchange(SHA256, "mallory", "y").first()).split(b",")[1]
    with pytest.raises(ScramError, match="^authentication failed$"):
        _login(creds, "mallory", "x")


def test_credential_of_the_other_mechanism_does_not_log_in():
    creds = {"alice": make_credential(Mechanism.SCRAM_SHA_512, "pw")}
    with pytest.raises(ScramError, match="authentication failed"):
        _login(creds, "alice", "pw", SHA256)


def test_replayed_client_final_is_refused_by_the_nonce_check():
    creds = {"alice": make_credential(SHA256, "pw")}
    client = ClientExchange(SHA256, "alice", "pw")
    first_server = _server(creds)
    recorded = client.final(first_server.first(client.first()))
    first_server.final(recorded)
    replay_server = _server(creds)  # a new exchange: a new server nonce
    replay_server.first(client.first())
    with pytest.raises(ScramError, match="nonce does not match"):
        replay_server.final(recorded)
    assert not replay_server.authenticated


@pytest.mark.parametrize("change", ["proof", "nonce", "channel"])
def test_altered_client_final_is_refused(change):
    creds = {"alice": make_credential(SHA256, "pw")}
    client = ClientExchange(SHA256, "alice", "pw")
    server = _server(creds)
    channel, nonce, proof = client.final(server.first(client.first())).decode().split(",")
    if change == "proof":
        raw = bytearray(base64.b64decode(proof[2:]))
        raw[0] ^= 1
        proof = "p=" + base64.b64encode(bytes(raw)).decode()
    elif change == "nonce":
        nonce = nonce[:-1] + ("A" if nonce[-1] != "A" else "B")
    else:
        channel = "c=" + base64.b64encode(b"y,,").decode()
    with pytest.raises(ScramError):
        server.final(f"{channel},{nonce},{proof}".encode())
    assert not server.authenticated


def test_client_refuses_a_server_that_cannot_prove_the_credential():
    creds = {"alice": make_credential(SHA256, "pw")}
    client = ClientExchange(SHA256, "alice", "pw")
    server = _server(creds)
    server.final(client.final(server.first(client.first())))
    with pytest.raises(ScramError, match="server signature"):
        client.verify(b"v=" + base64.b64encode(b"x" * 32))


@pytest.mark.parametrize("message", [
    b"p=tls-unique,,n=alice,r=abc",       # channel binding asked for
    b"n,a=admin,n=alice,r=abc",           # an authzid
    b"n,,m=ext,n=alice,r=abc",            # a mandatory extension
    b"n,,n=alice,r=abc,x=1",              # an extension
    b"n,,r=abc,n=alice",                  # attributes out of order
    b"n,,n=al=ice,r=abc",                 # a bad escape
    b"n,,n=alice,r=a,b",                  # a comma in the nonce (a third attribute)
    b"n,,n=alice,r=",                     # an empty nonce
    b"n,,n=,r=abc",                       # an empty user
    b"n,,n=alice,r=" + b"a" * 2000,       # over the size limit
    b"n,,n=\xff,r=abc",                   # not UTF-8
])
def test_malformed_client_first_is_refused(message):
    with pytest.raises(ScramError):
        _server({}).first(message)


def test_messages_out_of_order_are_refused():
    server = _server({})
    with pytest.raises(ScramError, match="out of order"):
        server.final(b"c=biws,r=x,p=AAAA")
    with pytest.raises(ScramError, match="out of order"):  # a failed exchange stays failed
        server.first(ClientExchange(SHA256, "a", "b").first())


def test_credential_round_trips_json_and_never_holds_the_password():
    cred = make_credential(Mechanism.SCRAM_SHA_512, "hunter2")
    obj = cred.to_json()
    assert "hunter2" not in repr(obj)
    assert ScramCredential.from_json(obj) == cred
    with pytest.raises(ScramError, match="iterations"):
        ScramCredential.from_json({**obj, "iterations": 1})
    with pytest.raises(ScramError, match="malformed"):
        ScramCredential.from_json({"mechanism": "SCRAM-SHA-512"})


def test_escape_user():
    assert escape_user("a=b,c") == "a=3Db=2Cc"
