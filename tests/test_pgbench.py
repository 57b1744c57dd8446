"""pgbench through the proxy: `pgbench -i` (COPY, DDL, VACUUM) then the TPC-B-like script in every
query mode (simple, extended, prepared) with 4 clients, in both pool modes; no failed
transaction, and the balances moved by exactly what pgbench says it ran.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.fix_postgres import PgServer

CLIENTS, TRANSACTIONS = 4, 50
DSN_FIXTURES = {"session": "proxy_dsn", "transaction": "proxy_tx_dsn"}


def _pgbench(pg_bin: Path, *args: str) -> str:
    out = subprocess.run(
        [str(pg_bin / "pgbench"), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, f"pgbench {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def bench_db(pg_server: PgServer) -> str:
    """A database of its own, so pgbench's tables never meet other tests'."""
    pg_server.psql("DROP DATABASE IF EXISTS pgbench_ops")
    pg_server.psql("CREATE DATABASE pgbench_ops")
    return "pgbench_ops"


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_pgbench_through_proxy(
    request: pytest.FixtureRequest, pg_bin: Path, pg_server: PgServer, bench_db: str, pool_mode: str
) -> None:
    dsn = make_conninfo(request.getfixturevalue(DSN_FIXTURES[pool_mode]), dbname=bench_db)
    init = _pgbench(pg_bin, "-i", "-s", "1", "-q", dsn)
    assert "done" in init
    direct = pg_server.dsn_for(bench_db)
    with psycopg.connect(direct) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (100_000,)
    for mode in ("simple", "extended", "prepared"):
        out = _pgbench(pg_bin, "-n", "-M", mode, "-c", str(CLIENTS), "-j", "2", "-t", str(TRANSACTIONS), dsn)
        processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
        assert processed is not None, out
        assert processed.groups() == (str(CLIENTS * TRANSACTIONS),) * 2, out
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert failed is not None and failed.group(1) == "0", out
    with psycopg.connect(direct) as conn:
        history, moved = conn.execute("SELECT count(*), sum(delta) FROM pgbench_history").fetchone() or (0, 0)
        balance = conn.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()
    # Every transaction inserted one history row and moved its delta into one account.
    assert history == 3 * CLIENTS * TRANSACTIONS
    assert balance == (moved,)
