"""A failed pgml statement behaves as a failed statement in Postgres, whatever part of the proxy failed.

Inside a transaction block it aborts the block (ReadyForQuery 'E', then 25P02 until ROLLBACK);
outside one the connection stays idle and usable. Both protocols, both pool modes, for statements the
proxy answers itself and for statements that read rows upstream.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from tests.fix_proxy import ProxyProcess

FAILING = [
    # answered by the proxy alone
    ("SELECT pgml.embed('no-such-model', 'x')", ()),
    # reads rows upstream, the model fails per chunk
    ("SELECT relname, pgml.embed('no-such-model', relname) FROM pg_class LIMIT 3", ()),
    # extended protocol with a parameter
    ("SELECT pgml.embed(%s, 'x')", ("no-such-model",)),
]


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize(("sql", "params"), FAILING)
def test_failure_aborts_the_transaction_block(
    proxy: ProxyProcess, proxy_tx: ProxyProcess, mode: str, sql: str, params: tuple[str, ...]
) -> None:
    target = proxy if mode == "session" else proxy_tx
    with psycopg.connect(target.dsn()) as conn:  # not autocommit: psycopg opens a block
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS kept (v int)")
        conn.execute("INSERT INTO kept VALUES (1)")
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql, params or None)
        assert err.value.sqlstate == "42704"
        assert "no-such-model" in str(err.value)
        assert conn.info.transaction_status == TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.parametrize(("sql", "params"), FAILING)
def test_failure_outside_a_block_leaves_the_connection_idle(
    proxy: ProxyProcess, sql: str, params: tuple[str, ...]
) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql, params or None)
        assert err.value.sqlstate == "42704"
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("prepare", [False, True])
def test_a_local_call_in_a_failed_block_is_25p02(
    proxy: ProxyProcess, proxy_tx: ProxyProcess, mode: str, prepare: bool
) -> None:
    """As Postgres: after an error, nothing runs until ROLLBACK, a call the proxy answers itself
    neither. Before, a constant call sent as a simple Query ran (or gave its own error)."""
    target = proxy if mode == "session" else proxy_tx
    with psycopg.connect(target.dsn()) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT pgml.embed('no-such-model', 'x')", prepare=prepare)
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
