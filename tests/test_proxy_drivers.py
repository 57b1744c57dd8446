"""Real drivers through the real `pgml-proxy` subprocess, in both pool modes.

psycopg 3 (sync and async; text and binary; pipeline mode; COPY in and out; server-side
cursors; LISTEN/NOTIFY) and asyncpg (prepared statements, binary codecs, transactions,
a cancelled query giving 57014 with the connection still usable).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import sql

from tests.fix_proxy import ProxyProcess


@pytest.fixture(params=["session", "transaction"])
def px(request: pytest.FixtureRequest) -> ProxyProcess:
    name = "proxy" if request.param == "session" else "proxy_tx"
    proxy: ProxyProcess = request.getfixturevalue(name)
    return proxy


def test_psycopg_text_and_binary(px: ProxyProcess) -> None:
    with psycopg.connect(px.dsn(), connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT %s::int8, %s::text, %s::numeric, %s::date, %s::uuid, %s::float8[], NULL::text",
            [2**40, "héllo", decimal.Decimal("1.5"), dt.date(2024, 2, 29), uuid.UUID(int=7), [1.5, None]],
        ).fetchone()
        assert row == (2**40, "héllo", decimal.Decimal("1.5"), dt.date(2024, 2, 29), uuid.UUID(int=7),
                       [1.5, None], None)
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT %s::int4 + 1, '{1,2}'::int[]", [41]).fetchone() == (42, [1, 2])
        assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1
        many = conn.execute("SELECT g, repeat('x', g) FROM generate_series(1, 2000) g").fetchall()
        assert len(many) == 2000 and many[-1] == (2000, "x" * 2000)


def test_psycopg_errors_keep_connection(px: ProxyProcess) -> None:
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable) as err:
            conn.execute("SELECT * FROM no_such_table_xyz")
        diag = err.value.diag
        assert (diag.sqlstate, diag.severity_nonlocalized) == ("42P01", "ERROR")
        assert diag.statement_position is not None and diag.source_file is not None
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT %s / 0", [1])
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)


def test_psycopg_transactions(px: ProxyProcess) -> None:
    table = f"drv_tx_{px.port}"
    with psycopg.connect(px.dsn()) as conn:
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (a int)").format(sql.Identifier(table)))
        conn.commit()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
        conn.rollback()
        with conn.transaction():
            conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(sql.Identifier(table)))
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("CREATE TEMP TABLE u (a int primary key); INSERT INTO u VALUES (1), (1)")
        got = conn.execute(sql.SQL("SELECT array_agg(a) FROM {}").format(sql.Identifier(table))).fetchone()
        assert got == ([2],)
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        conn.commit()


def test_psycopg_pipeline_mode(px: ProxyProcess) -> None:
    errors: list[psycopg.Error] = []
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        try:  # psycopg may also raise PipelineAborted on exit, directly against Postgres too
            with conn.pipeline() as pipe:
                curs = [conn.execute("SELECT %s::int * 2", [i]) for i in range(20)]
                pipe.sync()
                try:  # psycopg raises the error at whichever call first sees it arrive
                    conn.execute("SELECT 1/g FROM generate_series(0, 0) g")
                    conn.execute("SELECT 'skipped by the upstream'")
                    pipe.sync()
                except psycopg.errors.DivisionByZero as exc:
                    errors.append(exc)
        except psycopg.errors.PipelineAborted:
            pass
        assert [e.sqlstate for e in errors] == ["22012"]
        assert [c.fetchone() for c in curs] == [(i * 2,) for i in range(20)]
        with conn.pipeline():
            later = [conn.execute("SELECT %s::text", [f"v{i}"]) for i in range(3)]
        assert [c.fetchone() for c in later] == [("v0",), ("v1",), ("v2",)]
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_psycopg_copy_in_and_out(px: ProxyProcess) -> None:
    with psycopg.connect(px.dsn()) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE c (a int, b text)")
        with cur.copy("COPY c FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row((i, f"row {i}"))
        assert cur.execute("SELECT count(*), sum(a) FROM c").fetchone() == (5000, sum(range(5000)))
        with cur.copy("COPY (SELECT a, b FROM c WHERE a < 3 ORDER BY a) TO STDOUT (FORMAT binary)") as copy:
            copy.set_types(["int4", "text"])
            assert list(copy.rows()) == [(0, "row 0"), (1, "row 1"), (2, "row 2")]
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with cur.copy("COPY c FROM STDIN") as copy:
                copy.write(b"not-a-number\tx\n")
        conn.rollback()
        assert cur.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_server_side_cursor(px: ProxyProcess) -> None:
    with psycopg.connect(px.dsn()) as conn:
        with conn.cursor(name="ssc") as cur:
            cur.itersize = 7
            cur.execute("SELECT g FROM generate_series(1, 100) g")
            assert [r[0] for r in cur] == list(range(1, 101))
        conn.commit()


def test_psycopg_listen_notify(px: ProxyProcess) -> None:
    if px.pool_mode == "transaction":
        pytest.skip("LISTEN needs a session: like PgBouncer, transaction pooling cannot keep it")
    channel = f"chan_{px.port}"
    with psycopg.connect(px.dsn(), autocommit=True) as listener, \
            psycopg.connect(px.dsn(), autocommit=True) as talker:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        talker.execute("SELECT pg_notify(%s, %s)", [channel, "payload-1"])
        got = next(listener.notifies(timeout=5))
        assert (got.channel, got.payload) == (channel, "payload-1")


async def test_psycopg_async(px: ProxyProcess) -> None:
    async with await psycopg.AsyncConnection.connect(px.dsn(), autocommit=True) as conn:
        async with conn.cursor(binary=True) as cur:
            await cur.execute("SELECT %s::text || '!'", ["async"])
            assert await cur.fetchone() == ("async!",)
        results = await asyncio.gather(*[_one(px, i) for i in range(8)])
        assert results == [i * i for i in range(8)]


async def _one(px: ProxyProcess, i: int) -> int:
    async with await psycopg.AsyncConnection.connect(px.dsn(), autocommit=True) as conn:
        cur = await conn.execute("SELECT %s::int * %s::int", [i, i])
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_asyncpg_prepared_codecs_transactions(px: ProxyProcess) -> None:
    conn = await asyncpg.connect(px.dsn(), timeout=10)
    try:
        stmt = await conn.prepare("SELECT $1::int4 * 2, $2::text[], $3::jsonb, $4::timestamptz")
        when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        for i in range(5):
            row = await stmt.fetchrow(i, ["a", None], '{"k": 1}', when)
            assert tuple(row) == (i * 2, ["a", None], '{"k": 1}', when)
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS ap (a int, b bytea)")
            await conn.executemany("INSERT INTO ap VALUES ($1, $2)", [(i, bytes([i])) for i in range(10)])
            assert await conn.fetchval("SELECT sum(a) FROM ap") == 45
            assert await conn.fetchval("SELECT b FROM ap WHERE a = 3") == b"\x03"
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await conn.fetchval("SELECT no_such_fn_xyz()")
        assert await conn.fetchval("SELECT $1::numeric + 1", decimal.Decimal("0.5")) == decimal.Decimal("1.5")
    finally:
        await conn.close()


def test_psycopg_cancel_gives_57014(px: ProxyProcess) -> None:
    """A CancelRequest with the proxy's key reaches this client's backend: 57014, then usable."""
    import threading

    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled) as err:
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert err.value.sqlstate == "57014"
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


async def test_asyncpg_cancel_and_timeout(px: ProxyProcess) -> None:
    conn = await asyncpg.connect(px.dsn(), timeout=10)
    watcher = await asyncpg.connect(px.dsn(), timeout=10)
    try:
        task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(30) /* asyncpg-cancel */"))
        await asyncio.sleep(0.5)
        task.cancel()  # asyncpg sends a CancelRequest with the key the proxy handed out
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval("SELECT 'usable'") == "usable"
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30) /* asyncpg-timeout */", timeout=0.5)
        assert await conn.fetchval("SELECT 2") == 2
        running = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30) /* asyncpg%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        )
        assert running == 0
    finally:
        await conn.close()
        await watcher.close()
