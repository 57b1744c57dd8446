"""Pooling through the real proxy: transaction-mode prepared statements and settings,
session-mode reset, pool exhaustion (an error, never a hang) and clients that vanish.

Small pools (one server connection) force clients to take turns, so every test here
exercises a server connection that another client used before.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from proxy import messages as m
from tests.fix_proxy import ProxyProcess


@pytest.fixture(scope="module")
def tx1(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("transaction", pool_size=1, pool_timeout=1.0)


@pytest.fixture(scope="module")
def sess1(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("session", pool_size=1, pool_timeout=0.5)


async def test_named_prepared_statements_across_clients(tx1: ProxyProcess) -> None:
    """asyncpg names and caches its statements; with one server connection shared they must follow it.

    (asyncpg's own prepare() ends with Flush, not Sync, so the server connection stays with
    it until its next Sync: the clients here take turns statement by statement.)
    """
    conns = [await asyncpg.connect(tx1.dsn(), timeout=10) for _ in range(4)]
    try:
        for round_ in range(3):
            for i, c in enumerate(conns):
                row = await c.fetchrow(f"SELECT $1::int * {i + 1}, 'client {i}'", round_)
                assert tuple(row) == (round_ * (i + 1), f"client {i}")
        results = await asyncio.gather(*[c.fetchval("SELECT $1::int * 5", i) for i, c in enumerate(conns)])
        assert results == [0, 5, 10, 15]
        stmt = await conns[0].prepare("SELECT $1::text || '!'")
        assert [await stmt.fetchval(x) for x in "ab"] == ["a!", "b!"]
    finally:
        for c in conns:
            await c.close()


def test_psycopg_prepared_statements_and_close(tx1: ProxyProcess) -> None:
    with psycopg.connect(tx1.dsn(), autocommit=True, prepare_threshold=0) as a, \
            psycopg.connect(tx1.dsn(), autocommit=True, prepare_threshold=0) as b:
        for i in range(4):
            assert a.execute("SELECT %s::int + 100", [i]).fetchone() == (i + 100,)
            assert b.execute("SELECT %s::text || 'b'", [str(i)]).fetchone() == (f"{i}b",)
        assert a.execute("SELECT %s::int + 100", [9]).fetchone() == (109,)


def test_deallocate_all_after_ddl(tx1: ProxyProcess) -> None:
    """psycopg sends DEALLOCATE ALL after DDL; the proxy's own server-side statements go too."""
    with psycopg.connect(tx1.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(3):
            assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
            conn.execute(f"CREATE TABLE IF NOT EXISTS pooling_ddl_{i} (a int)")  # DDL: cache reset
            assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
        conn.execute("DEALLOCATE ALL")
        assert conn.execute("SELECT %s::int + 1", [1]).fetchone() == (2,)


def test_settings_follow_their_client(tx1: ProxyProcess) -> None:
    with psycopg.connect(tx1.dsn(), autocommit=True) as a, psycopg.connect(tx1.dsn(), autocommit=True) as b:
        a.execute("SET DateStyle = 'German'")
        a.execute("SET search_path = pg_catalog")
        for _ in range(3):
            assert b.execute("SHOW DateStyle").fetchone() == ("ISO, MDY",)
            assert a.execute("SHOW DateStyle").fetchone() == ("German, DMY",)
            assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)
            assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert a.info.parameter_status("DateStyle") == "German, DMY"


def test_transaction_holds_its_connection_and_pool_exhaustion_errors(tx1: ProxyProcess) -> None:
    with psycopg.connect(tx1.dsn()) as holder, psycopg.connect(tx1.dsn(), autocommit=True) as other:
        holder.execute("SELECT 1")  # an open transaction keeps the only server connection
        start = time.monotonic()
        with pytest.raises(psycopg.errors.TooManyConnections) as err:
            other.execute("SELECT 2")
        assert err.value.sqlstate == "53300" and "pool_timeout" in str(err.value)
        assert time.monotonic() - start < 5
        holder.commit()
        assert other.execute("SELECT 3").fetchone() == (3,)


def test_session_pool_exhaustion_is_an_error_not_a_hang(sess1: ProxyProcess) -> None:
    with psycopg.connect(sess1.dsn()) as first:
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(sess1.dsn(), connect_timeout=10)
        assert time.monotonic() - start < 5
        assert "53300" in str(err.value) or "no server connection free" in str(err.value)
        assert first.execute("SELECT 1").fetchone() == (1,)


def test_session_reset_between_clients(sess1: ProxyProcess) -> None:
    with psycopg.connect(sess1.dsn(), autocommit=True) as a:
        a.execute("SET work_mem = '7MB'")
        a.execute("CREATE TEMP TABLE leftover (a int)")
        a.execute("PREPARE leftover_stmt AS SELECT 1")
        pid = a.info.backend_pid
    with psycopg.connect(sess1.dsn(), autocommit=True) as b:
        assert b.execute("SHOW work_mem").fetchone() == ("4MB",)
        assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        assert b.execute("SELECT to_regclass('pg_temp.leftover')").fetchone() == (None,)
        assert b.execute("SELECT pg_backend_pid()").fetchone() is not None
        assert pid != 0


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_vanishing_mid_query_does_not_leak(mode: str, tx1: ProxyProcess, sess1: ProxyProcess,
                                                  pg_dsn: str) -> None:
    px = tx1 if mode == "transaction" else sess1
    sock = socket.create_connection((px.host, px.port), timeout=10)
    sock.sendall(m.StartupMessage({"user": "postgres", "database": "postgres"}).encode())
    got = b""
    while not got.endswith(m.ReadyForQuery("I").encode()):
        got += sock.recv(4096)
    marker = f"vanish_{mode}"
    sock.sendall(m.Query(f"SELECT pg_sleep(30) /* {marker} */").encode())
    time.sleep(0.5)
    sock.close()  # gone without Terminate, mid-query
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        while time.monotonic() < deadline:
            running = direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                [f"%{marker} */"],
            ).fetchone()
            if running == (0,):
                break
            time.sleep(0.1)
        assert running == (0,)
    with psycopg.connect(px.dsn(), autocommit=True) as after:  # the single pool slot is free again
        assert after.execute("SELECT 'slot free'").fetchone() == ("slot free",)
