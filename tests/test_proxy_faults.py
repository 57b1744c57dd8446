"""Protocol faults of issue 15 through the real proxy, byte by byte (no driver sends these).

A client that vanishes while the upstream skips to Sync must neither leak nor poison its
server connection; a malformed message between valid ones gets Postgres's own answer in
Postgres's own order (compared against the same bytes sent directly); pool entries for
failed logins are not kept.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from types import SimpleNamespace

import psycopg
import pytest

from proxy import messages as m
from tests.fix_postgres import PgServer
from tests.fix_proxy import ProxyProcess
from tests.test_proxy_traps import Raw


def Wire(host: str, port: int, timeout: float = 10, **params: str) -> Raw:
    """A bare v3 client on (host, port), logged in: test_proxy_traps' `Raw`."""
    raw = Raw(SimpleNamespace(host=host, port=port), **params)  # type: ignore[arg-type]
    raw.sock.settimeout(timeout)
    return raw


def _pg_port(pg_dsn: str) -> int:
    return int(pg_dsn.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def tx1(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("transaction", pool_size=1, pool_timeout=2.0)


@pytest.fixture(scope="module")
def sess1(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("session", pool_size=1, pool_timeout=2.0)


def _vanish_after_unsynced_error(px: ProxyProcess) -> None:
    """Parse `select $1` with a type OID that does not exist (XX000 upstream), no Sync, leave."""
    w = Wire(px.host, px.port)
    w.send(m.Parse("", "select $1", (999999,)).encode(), m.FLUSH)
    t, body = w.read()
    assert t == b"E" and m.ErrorResponse.parse(body).fields["C"] == "XX000"
    w.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_vanishing_before_sync_neither_leaks_nor_poisons(
    mode: str, tx1: ProxyProcess, sess1: ProxyProcess
) -> None:
    px = tx1 if mode == "transaction" else sess1
    for _ in range(3):  # more than pool_size: a leak would exhaust the pool
        _vanish_after_unsynced_error(px)
    with psycopg.connect(px.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("set statement_timeout = '5s'")
        assert conn.execute("select 'hello'").fetchone() == ("hello",)


def _bad_flush_exchange(host: str, port: int) -> list[tuple[bytes, bytes]]:
    w = Wire(host, port)
    w.send(m.Query("select 1").encode() + b"H" + struct.pack("!i", 5) + b"x"
           + m.SYNC + m.Query("select 2").encode())
    got = w.until(b"Z", 3)
    w.close()
    return got


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_malformed_flush_answered_as_postgres_does(
    mode: str, proxy: ProxyProcess, proxy_tx: ProxyProcess, pg_dsn: str
) -> None:
    px = proxy_tx if mode == "transaction" else proxy
    direct = _bad_flush_exchange("127.0.0.1", _pg_port(pg_dsn))
    via = _bad_flush_exchange(px.host, px.port)
    assert [t for t, _ in via] == [t for t, _ in direct]
    codes = [m.ErrorResponse.parse(b).fields["C"] for t, b in via if t == b"E"]
    assert codes == ["08P01"]
    assert [b for t, b in via if t == b"D"] == [b for t, b in direct if t == b"D"]


def test_failed_logins_leave_no_pool_entry(own_proxy: Callable[..., ProxyProcess]) -> None:
    px = own_proxy(pool_mode="session", server_idle_timeout=1)
    for user in ("nosuchuser", "pg;drop"):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(px.dsn(user=user), connect_timeout=5).close()
    bad = socket.create_connection((px.host, px.port), timeout=5)
    body = struct.pack("!i", m.PROTOCOL_3_0) + b"user\0\xff\xfe\0database\0postgres\0\0"
    bad.sendall(struct.pack("!i", len(body) + 4) + body)
    answer = b""
    while chunk := bad.recv(4096):
        answer += chunk
    bad.close()
    assert b"SFATAL" in answer and (b"C28000" in answer or b"C22021" in answer)
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        conn.execute("select 1")

    def pools() -> list[tuple[str, str]]:
        with psycopg.connect(px.dsn(database="pgml_proxy"), autocommit=True) as admin:
            rows = admin.execute("SHOW POOLS").fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    assert pools() == [("postgres", "postgres")]
    deadline = time.monotonic() + 15  # the client is gone: the entry goes after the idle time
    while pools() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pools() == []


def test_direct_postgres_is_what_we_compare_against(pg_server: PgServer) -> None:
    """The reference stream itself: rows, Z, 08P01, Z, rows, Z (as issue 15 describes)."""
    got = _bad_flush_exchange("127.0.0.1", pg_server.port)
    assert b"".join(t for t, _ in got) == b"TDCZEZTDCZ"


def test_server_termination_reaches_the_client_as_sent(proxy: ProxyProcess, pg_dsn: str) -> None:
    """pg_terminate_backend on the pid the client was given: Postgres's FATAL 57P01, then the close."""
    w = Wire(proxy.host, proxy.port)
    [key] = [m.BackendKeyData.parse(b) for t, b in w.startup if t == b"K"]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("select pg_terminate_backend(%s)", [key.pid]).fetchone() == (True,)
    got = []
    with pytest.raises(ConnectionError):
        while True:
            got.append(w.read())
    w.close()
    assert [(t, m.ErrorResponse.parse(b).fields["C"]) for t, b in got] == [(b"E", "57P01")]
