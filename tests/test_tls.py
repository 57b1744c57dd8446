"""proxy.tls: the contexts themselves, TLS to a real Postgres that demands it, and TLS through the proxy.

The upstream side connects to a Postgres with ``ssl = on`` whose pg_hba.conf rejects
plain connections; the client side has psycopg ask the proxy for ``sslmode=require``
with a self-signed test certificate, and checks that a proxy without one says 'N'.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from core.errors import ConfigError
from proxy import tls
from proxy.auth import UpstreamAuthenticator
from tests.fix_postgres import PG_USER, PgServer, start_postgres


@pytest.fixture(scope="module")
def cert_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgml-test-tls-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cert(cert_dir: Path) -> tuple[Path, Path]:
    return tls.make_self_signed(cert_dir / "proxy")


def test_self_signed_cert_loads(cert: tuple[Path, Path]) -> None:
    ctx = tls.client_context(SimpleNamespace(tls_cert=str(cert[0]), tls_key=str(cert[1])))
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cert[0].read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert cert[1].stat().st_mode & 0o777 == 0o600


def test_client_context_off_and_bad(cert: tuple[Path, Path], cert_dir: Path) -> None:
    assert tls.client_context(SimpleNamespace(tls_cert="", tls_key="")) is None
    bogus = cert_dir / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_cert"):
        tls.client_context(SimpleNamespace(tls_cert=str(bogus), tls_key=str(cert[1])))


def test_upstream_context_modes() -> None:
    assert tls.upstream_context("disable") is None
    for mode in ("prefer", "require"):
        ctx = tls.upstream_context(mode)
        assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    with pytest.raises(ConfigError, match="upstream_sslmode"):
        tls.upstream_context("verify-full")


def test_sslmode_from_dsn() -> None:
    assert tls.sslmode_from_dsn("host=h dbname=d", "prefer") == "prefer"
    assert tls.sslmode_from_dsn("postgresql://u@h/d?sslmode=require", "disable") == "require"
    assert tls.sslmode_from_dsn("host=h sslmode=allow", "disable") == "prefer"
    with pytest.raises(ConfigError, match="verify-ca"):
        tls.sslmode_from_dsn("host=h sslmode=verify-ca", "prefer")


# --- a Postgres that only takes TLS ------------------------------------------------------------------


DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def tls_pg(cert_dir: Path) -> Iterator[PgServer]:
    if not (DEBIAN_PG_BIN / "postgres").exists():
        pytest.skip("needs Debian's postgresql-15 (built with OpenSSL)")
    crt, key = tls.make_self_signed(cert_dir / "pg")
    if os.geteuid() == 0:  # the server runs as PG_USER and insists on owning its key
        user = pwd.getpwnam(PG_USER)
        for path in (crt.parent, crt, key):
            os.chown(path, user.pw_uid, user.pw_gid)
    hba = ("local all all trust\nhostssl all scram_tls 127.0.0.1/32 scram-sha-256\n"
           "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n")
    base = Path(tempfile.mkdtemp(prefix="pgml-test-tlspg-"))
    base.chmod(0o755)
    conf = {"ssl": "on", "ssl_cert_file": f"'{crt}'", "ssl_key_file": f"'{key}'"}
    # pgserver's Postgres is built without OpenSSL; Debian's (on PATH for the tests) has it.
    server = start_postgres(base, conf=conf, hba=hba, bin_dir=DEBIAN_PG_BIN)
    try:
        server.psql("CREATE ROLE scram_tls LOGIN PASSWORD 'tls pw'")
        yield server
    finally:
        server.proc.send_signal(signal.SIGINT)  # fast shutdown: do not wait for clients
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _recv_message(sock: Any) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 5:
        head += sock.recv(5 - len(head))
    length = struct.unpack("!I", head[1:])[0] - 4
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return head[:1], body


@pytest.mark.parametrize(("user", "password"), [("postgres", None), ("scram_tls", "tls pw")])
def test_upstream_tls_to_real_postgres(tls_pg: PgServer, user: str, password: str | None) -> None:
    """TLS, then a login; over TLS Postgres offers SCRAM-SHA-256-PLUS too and we pick plain SCRAM."""
    ctx = tls.upstream_context("require")
    assert ctx is not None
    with socket.create_connection(("127.0.0.1", tls_pg.port), timeout=10) as raw:
        raw.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest
        assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw) as sock:
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            params = f"user\0{user}\0database\0postgres\0\0".encode()
            sock.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
            authn = UpstreamAuthenticator(user, password)
            offered: list[bytes] = []
            kinds: list[bytes] = []
            while not kinds or kinds[-1] != b"Z":
                kind, body = _recv_message(sock)
                kinds.append(kind)
                assert kind != b"E", body
                if kind == b"R":
                    if body[:4] == struct.pack("!I", 10):
                        offered = [m for m in body[4:].split(b"\0") if m]
                    for message in authn.feed(body).messages:
                        sock.sendall(message)
            assert authn.done
            if password is not None:
                assert offered == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
            sql = b"SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()\0"
            sock.sendall(b"Q" + struct.pack("!I", len(sql) + 4) + sql)
            rows = []
            while True:
                kind, body = _recv_message(sock)
                if kind == b"D":
                    rows.append(body[6:])  # int16 count, int32 length, value
                if kind == b"Z":
                    break
            assert rows == [b"true"]


def test_plain_connection_is_rejected_by_tls_pg(tls_pg: PgServer) -> None:
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|reject"):
        psycopg.connect(tls_pg.dsn + "?sslmode=disable", connect_timeout=5).close()


# --- through the proxy -------------------------------------------------------------------------------


def test_client_tls_through_proxy(own_proxy: Callable[..., Any], cert: tuple[Path, Path]) -> None:
    proxy = own_proxy(tls_cert=str(cert[0]), tls_key=str(cert[1]))
    with psycopg.connect(proxy.dsn(), sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.rollback()
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    with psycopg.connect(proxy.dsn(), sslmode="disable") as conn:  # TLS is offered, not forced
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_proxy_without_cert_answers_n(proxy_dsn: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy_dsn, sslmode="require", connect_timeout=5).close()
    with psycopg.connect(proxy_dsn, sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_upstream_tls_through_proxy(
    own_proxy: Callable[..., Any], tls_pg: PgServer, pool_mode: str
) -> None:
    proxy = own_proxy(pool_mode=pool_mode, upstream=tls_pg.dsn, upstream_sslmode="require")
    with psycopg.connect(proxy.dsn(), sslmode="disable") as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
