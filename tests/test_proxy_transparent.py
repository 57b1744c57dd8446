"""Session pooling as transparent as a TCP relay (issue 10), with psycopg and psql as users run them.

Each case runs direct and through the proxy and compares: startup parameters (libpq's
PGDATESTYLE/PGTZ) and RESET returning to them, the BackendKeyData pid being the server's
own (pg_terminate_backend, NOTIFY), large objects over FunctionCall, Postgres's own error
for PREPARE TRANSACTION after temporary objects, COPY into a table of the pgml schema.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.fix_proxy import ProxyProcess


@pytest.fixture(params=["session", "transaction"])
def px(request: pytest.FixtureRequest) -> ProxyProcess:
    proxy: ProxyProcess = request.getfixturevalue("proxy" if request.param == "session" else "proxy_tx")
    return proxy


def _styles(dsn: str) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        def show() -> tuple[str, ...]:
            row = conn.execute("select current_setting('DateStyle'), current_setting('TimeZone'), "
                               "current_setting('geqo'), date '2024-03-05'::text").fetchone()
            assert row is not None
            return tuple(str(v) for v in row)

        out.append(show())
        conn.execute("set datestyle = 'ISO, DMY'")
        conn.execute("set timezone = 'UTC'")
        conn.execute("reset datestyle")
        out.append(show())
        conn.execute("set datestyle = 'SQL, DMY'")
        conn.execute("reset all")
        out.append(show())
        conn.execute("set datestyle = 'SQL, DMY'")
        conn.execute("discard all")
        out.append(show())
    return out


def test_startup_parameters_reach_the_server(proxy: ProxyProcess, pg_dsn: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDATESTYLE", "Postgres,MDY")
    monkeypatch.setenv("PGTZ", "PST8PDT")
    monkeypatch.setenv("PGOPTIONS", "-c geqo=off")
    direct = _styles(pg_dsn)
    assert direct[0][0] == "Postgres, MDY" and direct[0][1] == "PST8PDT" and direct[0][2] == "off"
    assert _styles(proxy.dsn()) == direct
    monkeypatch.delenv("PGDATESTYLE")  # the next client of the pool gets the server default again
    monkeypatch.delenv("PGTZ")
    monkeypatch.delenv("PGOPTIONS")
    assert _styles(proxy.dsn()) == _styles(pg_dsn)


def test_backend_pid_is_the_servers(proxy: ProxyProcess, pg_dsn: str) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)
        conn.execute("listen transparent_chan")
        conn.execute("notify transparent_chan, 'hi'")
        got = next(conn.notifies(timeout=5, stop_after=1))
        assert (got.channel, got.payload, got.pid) == ("transparent_chan", "hi", pid)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            assert admin.execute("select pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        with pytest.raises(psycopg.errors.AdminShutdown):
            conn.execute("select 1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as again:  # the pool recovers
        assert again.execute("select 'after'").fetchone() == ("after",)


def test_cancel_reaches_the_right_backend(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        import threading

        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        timer.join()
        assert conn.execute("select 2").fetchone() == (2,)


def test_large_objects_over_function_call(px: ProxyProcess, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(5000))
    dst = tmp_path / "back.bin"
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    imported = subprocess.run(["psql", px.dsn(), "-X", "-v", "ON_ERROR_STOP=1", "-c", f"\\lo_import {src}"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert imported.returncode == 0, imported.stderr
    oid = int(imported.stdout.split()[-1])
    exported = subprocess.run(["psql", px.dsn(), "-X", "-v", "ON_ERROR_STOP=1",
                               "-c", f"\\lo_export {oid} {dst}", "-c", f"\\lo_unlink {oid}"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert exported.returncode == 0, exported.stderr
    assert dst.read_bytes() == src.read_bytes()


def _prepare_after_temp(dsn: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("create temp table transparent_tmp(a int)")
        try:
            conn.execute("prepare transaction 'transparent_gid'")
        except psycopg.Error as exc:
            return exc.sqlstate
        return None


def test_prepare_transaction_after_temp_objects(proxy: ProxyProcess, pg_dsn: str) -> None:
    assert _prepare_after_temp(proxy.dsn()) == _prepare_after_temp(pg_dsn) == "0A000"


def test_copy_into_the_pgml_schema_passes_through(px: ProxyProcess, pg_dsn: str) -> None:
    table = f"pgml.copy_target_{px.pool_mode}"
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        direct.execute("create schema if not exists pgml")
        direct.execute(f"drop table if exists {table}")
        direct.execute(f"create table {table} (label int, text text)")
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
            for i in range(100):
                copy.write_row((i % 3, f"tweet {i}"))
        assert conn.execute(f"select count(*), sum(label) from {table}").fetchone() == (100, 99)
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        direct.execute(f"drop table {table}")


UNPOOLABLE = [
    "listen some_chan",
    "select pg_advisory_lock(42)",
    "select pg_try_advisory_lock_shared(42)",
    "declare held cursor with hold for select 1",
]


@pytest.mark.parametrize("sql", UNPOOLABLE)
def test_transaction_pooling_refuses_what_it_cannot_keep(proxy_tx: ProxyProcess, sql: str) -> None:
    with psycopg.connect(proxy_tx.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute(sql)
        assert "pool_mode=transaction" in str(err.value)
        assert err.value.diag.message_hint is not None and "pool_mode=session" in err.value.diag.message_hint
        assert conn.execute("select 'still usable'").fetchone() == ("still usable",)
        if "listen" not in sql:  # inside a block the refusal aborts it, as any failed statement
            conn.execute("begin")
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                conn.execute(sql.replace("%", "%%"), prepare=True)
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("select 1")
            conn.execute("rollback")


def test_session_pooling_keeps_them(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select pg_advisory_lock(42)").fetchone() == ("",)
        assert conn.execute("select pg_advisory_unlock(42)").fetchone() == (True,)
        conn.execute("declare held cursor with hold for select 7")
        assert conn.execute("fetch 1 from held").fetchone() == (7,)
        conn.execute("close held")


@pytest.mark.parametrize("sql, want", [
    # Runs upstream (a SQL function the proxy installs): its `$1` must still be counted.
    ("SELECT pgml.cosine_similarity($1::float4[], ARRAY[1, 2, 4]::float4[]) AS sim", [1021]),
    ("SELECT pgml.embed('intfloat/e5-small-v2', $1) AS e", [25]),
    ("SELECT $2::int + $1::int", [23, 23]),
])
def test_describe_counts_undeclared_parameters(px: ProxyProcess, sql: str, want: list[int]) -> None:
    """lib/pq's habit: Parse the unnamed statement declaring no types, Describe it, and send as
    many values as the ParameterDescription lists (it refuses to bind otherwise)."""
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        assert conn.pgconn.prepare(b"", sql.encode(), None).status == psycopg.pq.ExecStatus.COMMAND_OK
        desc = conn.pgconn.describe_prepared(b"")
        assert [desc.param_type(i) for i in range(desc.nparams)] == want
        assert desc.nfields == 1
        assert conn.execute("select 1").fetchone() == (1,)
