"""After the upstream restarts, the runtime's own connections (registry pool, LISTEN) come back
by themselves: the first pgml.predict succeeds, and a deploy announced afterwards is seen.

Each test has its own Postgres (it is restarted), with the real proxy in front of it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fix_postgres import PgServer, start_postgres
from tests.fix_proxy import ProxyProcess

pytestmark = pytest.mark.slow
SETOSA = "ARRAY[5.1, 3.5, 1.4, 0.2]"


@pytest.fixture
def private_pg() -> Iterator[PgServer]:
    base = Path(tempfile.mkdtemp(prefix="pgml-restart-pg-"))
    base.chmod(0o755)
    server = start_postgres(base)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def one(px: ProxyProcess, sql: str) -> object:
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def listening(server: PgServer) -> bool:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN pgml_deploy' AND state = 'idle'"
        ).fetchone()
        return bool(row and row[0])


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_predict_after_upstream_restart(
    private_pg: PgServer, own_proxy: Callable[..., ProxyProcess], pool_mode: str
) -> None:
    px = own_proxy(pool_mode=pool_mode, upstream=private_pg.dsn)
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        conn.execute("SELECT * FROM pgml.load_dataset('iris')")
        conn.execute("SELECT * FROM pgml.train('rs', 'regression', 'pgml.iris', 'target')")
        conn.execute(
            "SELECT * FROM pgml.train('rs', algorithm => 'xgboost', automatic_deploy => false,"
            " hyperparams => '{\"n_estimators\": 1}')"
        )
    linear = one(px, f"SELECT pgml.predict('rs', {SETOSA})")
    private_pg.restart()
    # The first statement after the restart: no 57P01 from a connection lost with the old server.
    assert one(px, f"SELECT pgml.predict('rs', {SETOSA})") == linear
    assert one(px, "SELECT count(*) FROM pgml.models") == 2  # registry reads work too

    # The LISTEN connection came back by itself: a deploy announced upstream is seen.
    deadline = time.monotonic() + 15
    while not listening(private_pg):
        assert time.monotonic() < deadline, "the LISTEN connection did not come back"
        time.sleep(0.2)
    with psycopg.connect(private_pg.dsn, autocommit=True) as direct:
        direct.execute(
            "INSERT INTO pgml.deployments (project_id, model_id, strategy)"
            " SELECT project_id, max(id), 'specific' FROM pgml.models GROUP BY project_id"
        )
        direct.execute("SELECT pg_notify('pgml_deploy', 'rs')")
    deadline = time.monotonic() + 10
    while one(px, f"SELECT pgml.predict('rs', {SETOSA})") == linear:
        assert time.monotonic() < deadline, "the deploy NOTIFY after the restart was not seen"
        time.sleep(0.2)
