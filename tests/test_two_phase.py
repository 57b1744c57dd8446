"""Two-phase commit through the proxy (issue 10), in both pool modes, against the same run direct.

A Postgres with `max_prepared_transactions` on; psycopg's own TPC API (`tpc_begin`, `tpc_prepare`,
`tpc_commit`, `tpc_recover`) and the SQL forms. `PREPARE TRANSACTION` ends the transaction on its
server connection, so in transaction pooling the connection goes back to the pool and another
client (on another server connection) may commit or roll back the prepared transaction, as with
PgBouncer. Each scenario runs direct and through the proxy; the visible outcomes must agree.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from testing.postgres import PgServer, start_postgres
from testing.proxy import ProxyProcess, start_proxy


@pytest.fixture(scope="module")
def tpc_pg() -> Iterator[PgServer]:
    base = Path(tempfile.mkdtemp(prefix="pgml-test-tpc-"))
    base.chmod(0o755)
    server = start_postgres(base, conf={"max_prepared_transactions": "10"})
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["session", "transaction"])
def tpc_proxy(request: pytest.FixtureRequest, tpc_pg: PgServer) -> Iterator[ProxyProcess]:
    p = start_proxy(tpc_pg.dsn, request.param)
    yield p
    p.stop()


def _scenario(dsn: str, table: str) -> list[object]:
    """Prepare with one client, finish with others; what each step shows."""
    seen: list[object] = []
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (a int)")
    # psycopg's TPC API: prepare, then recover and commit from another connection.
    a = psycopg.connect(dsn)  # not a `with`: its exit would commit(), which TPC forbids
    xid = a.xid(7, f"{table}_g1", "b1")
    a.tpc_begin(xid)
    a.execute(f"INSERT INTO {table} VALUES (1)")
    a.tpc_prepare()
    a.close()
    with psycopg.connect(dsn, autocommit=True) as b:
        seen.append(b.execute(f"SELECT count(*) FROM {table}").fetchone())  # not yet visible
        pending = [x for x in b.tpc_recover() if x.gtrid == f"{table}_g1"]
        seen.append([(x.format_id, x.gtrid, x.bqual) for x in pending])
    c = psycopg.connect(dsn)
    c.tpc_commit(pending[0])
    c.close()
    # The SQL forms: PREPARE TRANSACTION, then ROLLBACK PREPARED by another client.
    with psycopg.connect(dsn, autocommit=True) as d:
        d.execute("BEGIN")
        d.execute(f"INSERT INTO {table} VALUES (2)")
        d.execute(f"PREPARE TRANSACTION '{table}_g2'")
        seen.append(d.execute("SELECT 'after prepare, the session goes on'").fetchone())
    with psycopg.connect(dsn, autocommit=True) as e:
        gid = f"{table}_g2"
        seen.append(e.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchall())
        e.execute(f"ROLLBACK PREPARED '{table}_g2'")
        seen.append(e.execute(f"SELECT array_agg(a ORDER BY a) FROM {table}").fetchone())
        # A gid that does not exist: Postgres's own error.
        try:
            e.execute(f"COMMIT PREPARED '{table}_nope'")
        except psycopg.Error as exc:
            seen.append(exc.sqlstate)
        # PREPARE TRANSACTION outside a transaction block is a WARNING, and nothing is prepared.
        notices: list[str] = []
        e.add_notice_handler(lambda n: notices.append(f"{n.severity} {n.message_primary}"))
        e.execute(f"PREPARE TRANSACTION '{table}_g3'")
        seen.append(notices)
        seen.append(e.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE %s",
                              (f"{table}_%",)).fetchone())
    return seen


def test_two_phase_commit_matches_direct(tpc_proxy: ProxyProcess, tpc_pg: PgServer) -> None:
    direct = _scenario(tpc_pg.dsn, f"tpc_{tpc_proxy.pool_mode}")
    proxied = _scenario(tpc_proxy.dsn(), f"tpc_{tpc_proxy.pool_mode}")
    assert proxied == direct
    assert direct[0] == (0,) and direct[2] == ("after prepare, the session goes on",)
    assert direct[4] == ([1],) and direct[5] == "42704"
