"""Transaction pooling with psycopg as applications use it: the prepared statements that
psycopg creates on its own (prepare_threshold), its DEALLOCATE housekeeping, pipelines,
errors and reconnects, on fewer server connections than clients; what
`pg_prepared_statements` shows a client.
"""

from __future__ import annotations

import random
import select
from collections.abc import Callable

import psycopg
import pytest
from psycopg import errors as pe

from tests.fix_proxy import ProxyProcess

BYTEA_SQL = "select %s::bytea = set_byte('x', 0, %s)"


@pytest.fixture(scope="module")
def tx3(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("transaction", pool_size=3, pool_timeout=5.0)


@pytest.fixture(scope="module")
def tx1(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("transaction", pool_size=1, pool_timeout=5.0)


def test_failed_discard_all_leaves_statements_prepared(tx1: ProxyProcess) -> None:
    """A DISCARD ALL that fails (inside a transaction) drops nothing: the others' statements stay.

    Before, any Query naming DISCARD or DEALLOCATE emptied the proxy's account of the server
    connection, and the next client re-prepared into DuplicatePreparedStatement.
    """
    with psycopg.connect(tx1.dsn(), prepare_threshold=0) as a, \
            psycopg.connect(tx1.dsn(), autocommit=True, prepare_threshold=0) as b:
        assert b.execute(BYTEA_SQL, [b"x", 120]).fetchone() == (True,)
        with pytest.raises(pe.ActiveSqlTransaction):
            a.execute("discard all")
        a.rollback()
        for _ in range(3):
            assert b.execute(BYTEA_SQL, [b"x", 120]).fetchone() == (True,)


def test_same_statement_name_two_clients_one_connection(tx1: ProxyProcess) -> None:
    """Two clients' `_pg3_0` are different statements on the one server connection: each
    re-execution (Bind, Describe, Execute, Sync in one batch, relayed in one step under the
    statement's upstream name when the connection holds it) runs the client's own, and an
    error in one leaves both going on."""
    with psycopg.connect(tx1.dsn(), autocommit=True, prepare_threshold=0) as a, \
            psycopg.connect(tx1.dsn(), autocommit=True, prepare_threshold=0) as b:
        for i in range(1, 30):
            assert a.execute("select 100 / %s::int", [i]).fetchone() == (100 // i,)
            assert b.execute("select %s::text || 'b'", [str(i)]).fetchone() == (f"{i}b",)
            if i % 10 == 0:
                with pytest.raises(pe.DivisionByZero):
                    a.execute("select 100 / %s::int", [0])
                b.execute("deallocate all")  # b's statements go; a's stay prepared upstream
        assert a.execute("select 100 / %s::int", [4]).fetchone() == (25,)
        names = {r[0] for r in b.execute("select name from pg_prepared_statements")}
        assert "_pg3_0" not in names  # the upstream names are the proxy's shared ones


def test_psycopg_reexecution_prepares_once(tx3: ProxyProcess) -> None:
    """psycopg prepares on the 5th execution; DDL makes it send DEALLOCATE ALL; re-execution goes on."""
    conns = [psycopg.connect(tx3.dsn(), autocommit=True) for _ in range(4)]
    try:
        for round_ in range(30):
            for i, c in enumerate(conns):
                assert c.execute(BYTEA_SQL, [b"x", 120]).fetchone() == (True,)
                assert c.execute(BYTEA_SQL, [b"y", 120]).fetchone() == (False,)
                if round_ % 7 == i:
                    c.execute("create table if not exists txpool_ddl (a int)")
                    c.execute("drop table if exists txpool_ddl")  # psycopg: DEALLOCATE ALL
    finally:
        for c in conns:
            c.close()


def test_psycopg_evicted_statement_is_deallocated(tx3: ProxyProcess) -> None:
    """psycopg's cache overflows (prepared_max): it closes the statement it evicts.

    (With libpq 17+ that is a protocol Close; older libpq gets `DEALLOCATE _pg3_N`, which the
    stateful test and tests/test_txstate.py cover as SQL DEALLOCATE of a protocol statement.)
    """
    with psycopg.connect(tx3.dsn(), autocommit=True, prepare_threshold=0) as c:
        c.prepared_max = 2
        for i in range(8):
            assert c.execute(f"select %s::int + {i}", [1]).fetchone() == (1 + i,)
        for i in range(8):
            assert c.execute(f"select %s::int + {i}", [2]).fetchone() == (2 + i,)


def _client_round(rng: random.Random, c: psycopg.Connection[tuple[object, ...]]) -> None:
    op = rng.randrange(6)
    n = rng.randrange(4)
    if op == 0:
        assert c.execute(f"select %s::int * {n}", [3]).fetchone() == (3 * n,)
    elif op == 1:
        with c.pipeline() as p:
            cur = c.execute(f"select %s::int + {n}", [1])
            cur2 = c.execute(BYTEA_SQL, [b"x", 120])
            p.sync()
            assert cur.fetchone() == (1 + n,)
            assert cur2.fetchone() == (True,)
    elif op == 2:
        with pytest.raises(pe.DivisionByZero):
            with c.pipeline():
                c.execute(f"select %s::int / 0 + {n}", [1])
                c.execute(f"select %s::int + {n}", [1])
    elif op == 3:  # psycopg answers a DROP by sending DEALLOCATE ALL
        c.execute("drop table if exists no_such_table_here")
    elif op == 4:
        with c.transaction():
            assert c.execute(f"select %s::int - {n}", [1]).fetchone() == (1 - n,)
            with pytest.raises(pe.UndefinedTable):
                with c.transaction():
                    c.execute("select * from no_such_table_here")
    else:
        assert c.execute(BYTEA_SQL, [b"y", 120]).fetchone() == (False,)


@pytest.mark.parametrize("where", ["direct", "proxy"])
def test_psycopg_clients_interleaved(where: str, tx3: ProxyProcess, pg_dsn: str) -> None:
    """8 clients on 3 server connections, thresholds 0/1/5, pipelines, errors, DEALLOCATE ALL, reconnects.

    The same run direct proves the script itself is one Postgres accepts.
    """
    dsn = tx3.dsn() if where == "proxy" else pg_dsn
    rng = random.Random(10)
    conns = [psycopg.connect(dsn, autocommit=True, prepare_threshold=(0, 1, 5)[i % 3]) for i in range(8)]
    try:
        for _ in range(400):
            i = rng.randrange(len(conns))
            if rng.random() < 0.03:
                conns[i].close()
                conns[i] = psycopg.connect(dsn, autocommit=True,
                                           prepare_threshold=rng.choice((0, 1, 5)))
            _client_round(rng, conns[i])
    finally:
        for c in conns:
            c.close()


def test_pg_prepared_statements_describes_the_server_connection(tx1: ProxyProcess) -> None:
    """What a client sees there in transaction mode (README.md, "Transaction pooling").

    The view belongs to the server connection: protocol-level statements appear under the
    proxy's shared names (pgmlproxy_<hash>, never the client's own `_pg3_0`), SQL-level ones
    under their own names, and so do those other clients left on that connection.
    """
    with psycopg.connect(tx1.dsn(), autocommit=True) as a, psycopg.connect(tx1.dsn(), autocommit=True) as b:
        assert a.execute("select %s::int + 41", [1], prepare=True).fetchone() == (42,)
        a.execute("PREPARE mine AS select 'mine'")
        assert a.execute("EXECUTE mine").fetchone() == ("mine",)
        seen = a.execute("select name, statement, from_sql from pg_prepared_statements").fetchall()
        names = {name for name, _, _ in seen}
        assert "_pg3_0" not in names
        assert any(n.startswith("pgmlproxy_") and text == "select $1::int + 41" and not sql
                   for n, text, sql in seen)
        assert ("mine", "PREPARE mine AS select 'mine'", True) in seen
        # b never prepared anything, yet shares the one server connection: it sees a's too.
        others = {row[0] for row in b.execute("select name from pg_prepared_statements")}
        assert "mine" in others and any(n.startswith("pgmlproxy_") for n in others)
        # ... but cannot use them: to b, "mine" does not exist, as on a connection of its own.
        with pytest.raises(pe.InvalidSqlStatementName):
            b.execute("EXECUTE mine")
        assert a.execute("EXECUTE mine").fetchone() == ("mine",)


def _until_sync(pgconn: psycopg.pq.abc.PGconn) -> list[psycopg.pq.abc.PGresult]:
    out = []
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            r = pgconn.get_result()
            if r is None:
                break
            out.append(r)
            if r.status == psycopg.pq.ExecStatus.PIPELINE_SYNC:
                return out
        select.select([pgconn.socket], [], [], 1)


@pytest.mark.parametrize("between", ["login", "pgml"])
def test_unnamed_statement_survives_the_proxys_own_queries(tx1: ProxyProcess, between: str) -> None:
    """lib/pq's QueryRow: Parse "" + Describe + Sync, then Bind "" + Execute + Sync, the server
    connection released in between. There another client's login applied its startup settings
    with a simple Query (or the planner ran its own statements), which drops the unnamed
    statement upstream; the proxy must parse it again before the Bind (it answered 26000
    'unnamed prepared statement does not exist' under Go's database/sql pool)."""
    # Every client logs in with the same startup settings (as one program's connections do), so
    # no settings need replaying when `a` comes back to the server connection.
    same = psycopg.conninfo.make_conninfo(tx1.dsn(), application_name="drv", client_encoding="UTF8")
    with psycopg.connect(same, autocommit=True) as a:
        p = a.pgconn
        p.enter_pipeline_mode()
        p.send_prepare(b"", b"SELECT ($1::int * 2)::text", None)
        p.send_describe_prepared(b"")
        p.pipeline_sync()
        assert [r.status for r in _until_sync(p)][-1] == psycopg.pq.ExecStatus.PIPELINE_SYNC
        if between == "login":
            # Only the login: what the client runs after it would replace the unnamed statement.
            psycopg.connect(same).close()
        else:
            with psycopg.connect(same, autocommit=True) as b:
                b.execute("select pgml.cosine_similarity(%s::float4[], array[1,2]::float4[])", [[1, 2]])
        p.send_query_prepared(b"", [b"21"])
        p.pipeline_sync()
        results = _until_sync(p)
        assert [r.error_message for r in results if r.status == psycopg.pq.ExecStatus.FATAL_ERROR] == []
        assert results[0].get_value(0, 0) == b"42"


def _asyncpg_named_then_sql_execute(host: str, port: int) -> list[object]:
    """asyncpg's test_prepare_explicitly_named: a protocol-level statement run by SQL EXECUTE."""
    import asyncio

    import asyncpg

    async def run() -> list[object]:
        con = await asyncpg.connect(host=host, port=port, user="postgres", database="postgres")
        try:
            # Kept: asyncpg closes a statement once its object is collected.
            ps = await con.prepare("select 1", name="foobar")
            out: list[object] = [ps.get_name(), await con.fetchval("EXECUTE foobar")]
            try:
                await con.prepare("select 1", name="foobar")
            except asyncpg.DuplicatePreparedStatementError as exc:
                out.append(exc.sqlstate)
            out.append(await con.fetchval("EXECUTE foobar"))
            return out
        finally:
            await con.close()

    return asyncio.run(run())


def test_protocol_statement_runs_by_sql_execute(tx1: ProxyProcess, pg_dsn: str) -> None:
    """The server must hold the client's statement under its own name when EXECUTE is parsed
    (Postgres reads its result columns then), not only when it is bound: before, the Describe
    said no columns and asyncpg refused the row."""
    direct = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    want = _asyncpg_named_then_sql_execute(str(direct.get("host", "127.0.0.1")), int(str(direct["port"])))
    assert want == ["foobar", 1, "42P05", 1]
    assert _asyncpg_named_then_sql_execute(tx1.host, tx1.port) == want


def test_temporary_tables_end_with_their_transaction(tx1: ProxyProcess) -> None:
    """A temporary table lives until its transaction ends: then the proxy drops it, so the next
    client on that server connection (pool_size 1: the same backend) cannot read it. Before, it
    stayed, and another client could `SELECT * FROM pg_temp.secret`."""
    with psycopg.connect(tx1.dsn()) as a, psycopg.connect(tx1.dsn(), autocommit=True) as b:
        a.execute("create temp table secret (v text)")  # psycopg opens a transaction block
        a.execute("insert into secret values ('only mine')")
        assert a.execute("select v from secret").fetchone() == ("only mine",)
        pid = a.execute("select pg_backend_pid()").fetchone()
        a.commit()
        assert b.execute("select pg_backend_pid()").fetchone() == pid  # the same server connection
        assert b.execute("select to_regclass('pg_temp.secret')").fetchone() == (None,)
        assert b.execute("select count(*) from pg_class where relpersistence = 't'"
                         " and relnamespace = pg_my_temp_schema()").fetchone() == (0,)
        with pytest.raises(pe.UndefinedTable):  # and its own client, in its next transaction
            a.execute("select v from secret")


@pytest.mark.parametrize("sql", ["create temp table alone (a int)",
                                 "CREATE TEMPORARY TABLE IF NOT EXISTS alone (a int);",
                                 "create temp view alone_v as select 1"])
def test_a_temporary_table_outside_a_block_is_refused(tx1: ProxyProcess, sql: str) -> None:
    """On its own (autocommit) it would be gone before the next statement: 0A000 naming the
    pool mode, in both protocols, and the connection goes on."""
    with psycopg.connect(tx1.dsn(), autocommit=True) as c:
        for prepare in (False, True):
            with pytest.raises(pe.FeatureNotSupported) as err:
                c.execute(sql, prepare=prepare)
            assert "pool_mode=transaction" in str(err.value)
            assert "pool_mode=session" in (err.value.diag.message_hint or "")
        assert c.execute("select 1").fetchone() == (1,)
        assert c.execute("select to_regclass('pg_temp.alone')").fetchone() == (None,)


def test_temporary_tables_that_end_in_their_statement_run(tx1: ProxyProcess) -> None:
    """What uses its temporary table within the same transaction is let through."""
    with psycopg.connect(tx1.dsn(), autocommit=True) as c:
        c.execute("create temp table gone (a int) on commit drop")
        cur = c.execute("create temp table imp (a int); insert into imp values (4), (5);"
                        " select sum(a) from imp")
        assert cur.nextset() and cur.nextset() and cur.fetchone() == (9,)
        assert c.execute("select to_regclass('pg_temp.imp')").fetchone() == (None,)
