"""proxy.auth: each method's round trip with byte fixtures, and the upstream side against a real Postgres.

The client side (the proxy playing the server) is driven by scramp's own client and by
hand-built messages; the upstream side (the proxy playing the client) logs in over a plain
socket to a Postgres whose pg_hba.conf asks for cleartext, md5 and scram-sha-256.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import signal
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import psycopg
import pytest
from scramp import ScramClient

from core.errors import InvalidPassword, ProtocolViolation
from proxy import auth
from tests.fix_postgres import PgServer, start_postgres
from tests.fix_proxy import TEST_CONFIG


def _config(method: str, **users: str) -> SimpleNamespace:
    return SimpleNamespace(auth_method=method, users=users)


def _body(message: bytes) -> tuple[bytes, bytes]:
    """Split a framed message into (type, body), checking its length word."""
    (length,) = struct.unpack("!I", message[1:5])
    assert length == len(message) - 1
    return message[:1], message[5:]


def _auth_code(message: bytes) -> tuple[int, bytes]:
    kind, body = _body(message)
    assert kind == b"R"
    return struct.unpack("!I", body[:4])[0], body[4:]


def test_message_bytes() -> None:
    assert auth.AUTH_OK_MESSAGE == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert auth.auth_message(auth.AUTH_CLEARTEXT) == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert auth.auth_message(auth.AUTH_MD5, b"abcd") == b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"
    sasl = auth.ClientAuthenticator(_config("scram-sha-256", u="p"), "u").start()
    assert sasl == [b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"]  # no -PLUS offered
    assert auth.password_message(b"pw\0") == b"p\x00\x00\x00\x07pw\x00"


def test_verifier_formats() -> None:
    # The value Postgres itself stores for user "alice" / password "secret".
    assert auth.md5_verifier("alice", "secret") == "md5" + hashlib.md5(b"secretalice").hexdigest()
    verifier = auth.scram_verifier("secret", salt=b"0123456789abcdef")
    assert verifier.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    secret = auth.parse_scram_verifier(verifier)
    assert secret is not None and secret.salt == b"0123456789abcdef" and secret.iterations == 4096
    assert auth.parse_scram_verifier("md5abc") is None


def test_trust() -> None:
    authn = auth.ClientAuthenticator(_config("trust"), "anyone")
    assert authn.start() == [auth.AUTH_OK_MESSAGE]
    assert authn.done


@pytest.mark.parametrize(
    "stored", ["secret", auth.md5_verifier("bob", "secret"), auth.scram_verifier("secret")]
)
def test_cleartext(stored: str) -> None:
    good = auth.ClientAuthenticator(_config("cleartext", bob=stored), "bob")
    assert _auth_code(good.start()[0]) == (auth.AUTH_CLEARTEXT, b"")
    step = good.feed(b"p", b"secret\0")
    assert step.done and step.error is None and step.messages == [auth.AUTH_OK_MESSAGE]

    bad = auth.ClientAuthenticator(_config("cleartext", bob=stored), "bob")
    bad.start()
    step = bad.feed(b"p", b"wrong\0")
    assert not step.done and isinstance(step.error, InvalidPassword)
    assert step.error.fields["C"] == "28P01" and step.error.fields["S"] == "FATAL"
    assert 'user "bob"' in step.error.message


@pytest.mark.parametrize("stored", ["secret", auth.md5_verifier("carol", "secret")])
def test_md5(stored: str) -> None:
    authn = auth.ClientAuthenticator(_config("md5", carol=stored), "carol")
    code, salt = _auth_code(authn.start()[0])
    assert code == auth.AUTH_MD5 and len(salt) == 4
    answer = auth.md5_response(auth.md5_verifier("carol", "secret"), salt)
    step = authn.feed(b"p", answer.encode() + b"\0")
    assert step.done and step.messages == [auth.AUTH_OK_MESSAGE]

    again = auth.ClientAuthenticator(_config("md5", carol=stored), "carol")
    _, salt = _auth_code(again.start()[0])
    wrong = auth.md5_response(auth.md5_verifier("carol", "nope"), salt)
    assert isinstance(again.feed(b"p", wrong.encode() + b"\0").error, InvalidPassword)


def _scram_login(authn: auth.ClientAuthenticator, password: str) -> auth.AuthStep:
    """Run a SCRAM exchange with scramp's client, as libpq would frame it."""
    code, mechs = _auth_code(authn.start()[0])
    assert code == auth.AUTH_SASL and mechs == b"SCRAM-SHA-256\0\0"
    client = ScramClient(["SCRAM-SHA-256"], authn.user, password)
    first = client.get_client_first().encode()
    step = authn.feed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    assert step.error is None and not step.done
    code, server_first = _auth_code(step.messages[0])
    assert code == auth.AUTH_SASL_CONTINUE
    client.set_server_first(server_first.decode())
    step = authn.feed(b"p", client.get_client_final().encode())
    if step.done:
        code, server_final = _auth_code(step.messages[0])
        assert code == auth.AUTH_SASL_FINAL
        client.set_server_final(server_final.decode())  # raises if the server's signature is wrong
        assert step.messages[1] == auth.AUTH_OK_MESSAGE
    return step


@pytest.mark.parametrize("stored", ["secret", auth.scram_verifier("secret")])
def test_scram(stored: str) -> None:
    config = _config("scram-sha-256", dave=stored)
    assert _scram_login(auth.ClientAuthenticator(config, "dave"), "secret").done
    step = _scram_login(auth.ClientAuthenticator(config, "dave"), "wrong")
    assert isinstance(step.error, InvalidPassword) and step.error.code == "28P01"


def test_scram_with_empty_user_name_as_libpq_sends() -> None:
    """libpq sends ``n,,n=,r=...``; the proof is computed by hand here (RFC 5802), as libpq does."""
    authn = auth.ClientAuthenticator(_config("scram-sha-256", dave="secret"), "dave")
    authn.start()
    bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL"
    first = ("n,," + bare).encode()
    step = authn.feed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    server_first = _auth_code(step.messages[0])[1].decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
    step = authn.feed(b"p", f"{without_proof},p={proof}".encode())
    assert step.done and step.error is None


def test_scram_unknown_user_runs_a_mock_exchange() -> None:
    step = _scram_login(auth.ClientAuthenticator(_config("scram-sha-256", dave="x"), "eve"), "x")
    assert isinstance(step.error, InvalidPassword)


def test_md5_method_with_scram_verifier_uses_scram() -> None:
    authn = auth.ClientAuthenticator(_config("md5", dave=auth.scram_verifier("pw")), "dave")
    assert _scram_login(authn, "pw").done


def test_passthrough_hands_the_password_on() -> None:
    authn = auth.ClientAuthenticator(_config("passthrough"), "frank")
    assert _auth_code(authn.start()[0])[0] == auth.AUTH_CLEARTEXT
    step = authn.feed(b"p", b"hunter2\0")
    assert step.done and step.passthrough_password == "hunter2" and step.messages == []


def test_client_protocol_errors() -> None:
    authn = auth.ClientAuthenticator(_config("cleartext", a="b"), "a")
    authn.start()
    assert isinstance(authn.feed(b"Q", b"SELECT 1\0").error, ProtocolViolation)
    assert isinstance(authn.feed(b"p", b"no terminator").error, ProtocolViolation)
    scram = auth.ClientAuthenticator(_config("scram-sha-256", a="b"), "a")
    scram.start()
    step = scram.feed(b"p", b"SCRAM-SHA-256-PLUS\0\xff\xff\xff\xff")
    assert step.error is not None and step.error.code == "28000"
    garbage = auth.ClientAuthenticator(_config("scram-sha-256", a="b"), "a")
    garbage.start()
    step = garbage.feed(b"p", b"SCRAM-SHA-256\0\x00\x00\x00\x03xyz")
    assert step.error is not None and step.error.code == "08P01"


@pytest.mark.parametrize("method", ["cleartext", "md5", "scram-sha-256"])
def test_upstream_against_our_client_side(method: str) -> None:
    """The two halves of this module talk to each other, message by message."""
    server = auth.ClientAuthenticator(_config(method, gina="pw"), "gina")
    client = auth.UpstreamAuthenticator("gina", "pw")
    outgoing = server.start()
    for _ in range(5):
        replies: list[bytes] = []
        for message in outgoing:
            replies += client.feed(_body(message)[1]).messages
        if client.done:
            break
        assert len(replies) == 1
        step = server.feed(*_body(replies[0]))
        assert step.error is None
        outgoing = step.messages
    assert client.done and server.done


def test_upstream_needs_a_password() -> None:
    with pytest.raises(InvalidPassword):
        auth.UpstreamAuthenticator("x", None).feed(struct.pack("!I", auth.AUTH_MD5) + b"salt")
    with pytest.raises(Exception, match="GSSAPI"):
        auth.UpstreamAuthenticator("x", "y").feed(struct.pack("!I", 7))


# --- against a real Postgres -------------------------------------------------------------------------

HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all clear_user 127.0.0.1/32 password
host all md5_user 127.0.0.1/32 md5
host all scram_user 127.0.0.1/32 scram-sha-256
"""


@pytest.fixture(scope="module")
def auth_pg() -> Iterator[PgServer]:
    base = Path(tempfile.mkdtemp(prefix="pgml-test-auth-"))
    base.chmod(0o755)
    server = start_postgres(base, hba=HBA)
    try:
        server.psql("CREATE ROLE clear_user LOGIN PASSWORD 'clear pw'")
        server.psql("SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5 pw'")
        server.psql("CREATE ROLE scram_user LOGIN PASSWORD 'scram pw'")
        yield server
    finally:
        server.proc.send_signal(signal.SIGINT)  # fast shutdown: do not wait for clients
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "upstream closed the connection"
            buf += chunk
        return buf

    head = exact(5)
    return head[:1], exact(struct.unpack("!I", head[1:])[0] - 4)


def _login(port: int, user: str, password: str | None) -> dict[str, str]:
    """Log in with UpstreamAuthenticator over a plain socket; returns ErrorResponse fields or {}."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        params = f"user\0{user}\0database\0postgres\0\0".encode()
        sock.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
        authn = auth.UpstreamAuthenticator(user, password)
        while True:
            kind, body = _read(sock)
            if kind == b"R":
                for message in authn.feed(body).messages:
                    sock.sendall(message)
            elif kind == b"E":
                parts = [p.decode() for p in body.split(b"\0") if p]
                return {p[0]: p[1:] for p in parts}
            elif kind == b"Z":
                assert authn.done
                return {}


@pytest.mark.parametrize(
    ("user", "password"), [("clear_user", "clear pw"), ("md5_user", "md5 pw"), ("scram_user", "scram pw")]
)
def test_upstream_real_postgres(auth_pg: PgServer, user: str, password: str) -> None:
    assert _login(auth_pg.port, user, password) == {}
    error = _login(auth_pg.port, user, "not the password")
    assert error["C"] == "28P01" and user in error["M"]


def test_upstream_trust_real_postgres(auth_pg: PgServer) -> None:
    assert _login(auth_pg.port, "postgres", None) == {}


# --- through the real proxy: libpq's and asyncpg's own SCRAM/md5 clients ------------------------------

@pytest.mark.parametrize("method", ["cleartext", "md5", "scram-sha-256"])
@pytest.mark.parametrize("stored", ["plain", "verifier"])
async def test_client_auth_through_proxy(
    own_proxy: Callable[..., Any], tmp_path: Path, method: str, stored: str
) -> None:
    secret = "s3cret pw"
    secret_stored = secret
    if stored == "verifier" and method == "scram-sha-256":
        secret_stored = auth.scram_verifier(secret)
    elif stored == "verifier":
        secret_stored = auth.md5_verifier("postgres", secret)
    # Users come from the config file (the environment cannot carry a table).
    config = TEST_CONFIG.read_text().replace("[proxy]\n", f'[proxy]\nauth_method = "{method}"\n', 1)
    config_path = tmp_path / "auth.toml"
    config_path.write_text(config + f'\n[users]\npostgres = "{secret_stored}"\n')
    proxy = own_proxy(config=config_path)
    with psycopg.connect(proxy.dsn(), password=secret) as conn:  # libpq's own implementation
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "postgres"'):
        psycopg.connect(proxy.dsn(), password="wrong", connect_timeout=5).close()
    conn2 = await asyncpg.connect(proxy.dsn(), password=secret)  # asyncpg's own implementation
    try:
        assert await conn2.fetchval("SELECT 6 * 7") == 42
    finally:
        await conn2.close()
    with pytest.raises(asyncpg.InvalidPasswordError) as bad:
        await asyncpg.connect(proxy.dsn(), password="wrong")
    assert bad.value.sqlstate == "28P01"


async def test_passthrough_through_proxy(own_proxy: Callable[..., Any], auth_pg: PgServer) -> None:
    """The proxy asks the client for a password and the upstream's scram-sha-256 check decides."""
    proxy = own_proxy(auth_method="passthrough", upstream=auth_pg.dsn)
    dsn = proxy.dsn(user="scram_user")
    with psycopg.connect(dsn, password="scram pw") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scram_user",)
    with pytest.raises(asyncpg.InvalidPasswordError) as bad:
        await asyncpg.connect(dsn, password="wrong")
    assert bad.value.sqlstate == "28P01"
    with psycopg.connect(dsn, password="scram pw") as conn:  # a failed login left nothing broken
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _raw_cleartext_login(port: int, user: str, password: str, database: str = "postgres") -> list[bytes]:
    """Log in through a cleartext-password exchange; the message types the server sent after
    the password, up to ReadyForQuery or ErrorResponse (R = Authentication*, its code shown)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        params = f"user\0{user}\0database\0{database}\0\0".encode()
        sock.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
        kind, body = _read(sock)
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 3  # cleartext asked for
        pw = password.encode() + b"\0"
        sock.sendall(b"p" + struct.pack("!I", len(pw) + 4) + pw)
        seen = []
        while True:
            kind, body = _read(sock)
            seen.append(kind + (str(struct.unpack("!I", body[:4])[0]).encode() if kind == b"R" else b""))
            if kind in (b"Z", b"E"):
                return seen


async def test_passthrough_says_ok_only_after_the_upstream(
    own_proxy: Callable[..., Any], auth_pg: PgServer
) -> None:
    proxy = own_proxy(auth_method="passthrough", upstream=auth_pg.dsn)
    assert _raw_cleartext_login(proxy.port, "scram_user", "scram pw")[0] == b"R0"
    # A wrong password: the upstream's refusal, never an AuthenticationOk before it.
    assert _raw_cleartext_login(proxy.port, "scram_user", "wrong") == [b"E"]
    # The admin database: the upstream checks the password there too.
    assert _raw_cleartext_login(proxy.port, "scram_user", "wrong", "pgml_proxy") == [b"E"]
    admin_dsn = proxy.dsn(user="scram_user", database="pgml_proxy")
    with psycopg.connect(admin_dsn, password="scram pw", autocommit=True) as admin:
        assert admin.execute("SHOW POOLS").fetchall()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(admin_dsn, password="nope").close()


async def test_admin_users_limit_the_admin_database(own_proxy: Callable[..., Any]) -> None:
    proxy = own_proxy(admin_users="ops")
    with pytest.raises(psycopg.OperationalError, match='may not connect to the admin database') as err:
        psycopg.connect(proxy.dsn(database="pgml_proxy")).close()
    assert "proxy.admin_users" in str(err.value)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as refused:
        await asyncpg.connect(proxy.dsn(database="pgml_proxy"))
    assert refused.value.sqlstate == "28000"
    with psycopg.connect(proxy.dsn(user="ops", database="pgml_proxy"), autocommit=True) as admin:
        cur = admin.execute("SHOW POOLS")
        assert "database" in [d.name for d in cur.description or []]
    with psycopg.connect(proxy.dsn()) as conn:  # other databases are not affected
        assert conn.execute("SELECT 1").fetchone() == (1,)
