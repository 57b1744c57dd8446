"""The `pgml-proxy` process: flags, config errors, SIGHUP reload, SIGINT drain, SIGTERM,
and the embedded Postgres keeping its data across restarts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from testing.proxy import ProxyProcess
from tests.fix_postgres import start_postgres
from tests.fix_proxy import ROOT, TEST_CONFIG, start_proxy


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_help_explains_flags() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for flag in ("--listen", "--upstream", "--pool-mode", "--config", "--data-dir"):
        assert flag in out.stdout


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    out = _cli("--pool-mode", "session", "--listen", "nonsense")
    assert out.returncode == 2 and "'proxy.listen'" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy]\npool_sise = 3\n")
    out = _cli("--config", str(bad))
    assert out.returncode == 2 and "pool_sise" in out.stderr and "unknown key" in out.stderr
    out = _cli("--config", str(TEST_CONFIG), env={"PGML_PROXY_POOL_SIZE": "zero"})
    assert out.returncode == 2 and "pool_size" in out.stderr


def test_reload_and_drain(pg_dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(TEST_CONFIG.read_text())
    px = start_proxy(pg_dsn, "transaction", config=config)
    try:
        config.write_text(TEST_CONFIG.read_text().replace("pool_size = 40", "pool_size = \"nope\""))
        px.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert "reload failed" in px.log() and "pool_size" in px.log()
        config.write_text(TEST_CONFIG.read_text().replace("pool_size = 40", "pool_size = 3"))
        px.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert "configuration reloaded" in px.log()
        with psycopg.connect(px.dsn()) as conn:
            conn.execute("CREATE TEMP TABLE drain_t (a int)")  # a transaction is open
            px.send_signal(signal.SIGINT)
            time.sleep(0.5)
            with pytest.raises(psycopg.OperationalError):  # no longer listening
                psycopg.connect(px.dsn(), connect_timeout=3)
            conn.execute("INSERT INTO drain_t VALUES (1)")
            assert conn.execute("SELECT count(*) FROM drain_t").fetchone() == (1,)
            conn.commit()  # the transaction finishes; then the client is let go
            with pytest.raises(psycopg.OperationalError):
                for _ in range(50):
                    conn.execute("SELECT 1")
                    conn.commit()
                    time.sleep(0.1)
        assert px.proc.wait(timeout=15) == 0
    finally:
        px.stop()


@pytest.mark.slow
def test_embedded_postgres_persists_across_restarts() -> None:
    data = Path(tempfile.mkdtemp(prefix="pgml-embedded-")) / "pgdata"
    try:
        px = start_proxy("", "session", data_dir=str(data))
        try:
            with psycopg.connect(px.dsn(), autocommit=True) as conn:
                conn.execute("CREATE TABLE kept (a text)")
                conn.execute("INSERT INTO kept VALUES ('survives')")
        finally:
            assert px.stop(signal.SIGTERM) == 0
        px = start_proxy("", "session", data_dir=str(data))
        try:
            with psycopg.connect(px.dsn(), autocommit=True) as conn:
                assert conn.execute("SELECT a FROM kept").fetchall() == [("survives",)]
        finally:
            px.stop(signal.SIGTERM)
    finally:
        shutil.rmtree(data.parent, ignore_errors=True)


def test_upstream_going_down_and_coming_back() -> None:
    """Clients get clean errors while the upstream is down; the proxy serves again once it is back."""
    base = Path(tempfile.mkdtemp(prefix="pgml-updown-"))
    base.chmod(0o755)
    pg = start_postgres(base)
    px = start_proxy(pg.dsn, "transaction")
    try:
        conn = psycopg.connect(px.dsn(), autocommit=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        args = pg.proc.args
        pg.proc.send_signal(signal.SIGINT)  # fast shutdown: backends are terminated
        pg.proc.wait(30)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 2")
        conn.close()
        with pytest.raises(psycopg.OperationalError, match="cannot reach the upstream"):
            psycopg.connect(px.dsn(), connect_timeout=10)
        pg.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   **_pg_user())  # type: ignore[call-overload]
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(px.dsn(), autocommit=True, connect_timeout=5) as again:
                    assert again.execute("SELECT 'back'").fetchone() == ("back",)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert px.proc.poll() is None
    finally:
        px.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _pg_user() -> dict[str, object]:
    import pwd

    from tests.fix_postgres import PG_USER

    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(PG_USER)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def test_open_files_limit_raised_and_logged(proxy: ProxyProcess) -> None:
    """Each client is a socket: the proxy raises its soft RLIMIT_NOFILE to the hard one at start."""
    limits = Path(f"/proc/{proxy.pid}/limits").read_text().splitlines()
    [line] = [x for x in limits if x.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard or hard == "unlimited", line
    assert f"open files limit {soft}" in proxy.log()
