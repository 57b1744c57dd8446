"""psql and pgbench (libpq) through the real proxy, in both pool modes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.fix_proxy import ProxyProcess

PSQL_SCRIPT = r"""
\set ON_ERROR_STOP 0
CREATE TEMP TABLE tools_t (id int PRIMARY KEY, name text);
INSERT INTO tools_t VALUES (1, 'one'), (2, 'two');
SELECT name FROM tools_t ORDER BY id;
SELECT 1/0;
SELECT 'after error' AS still;
\copy tools_t FROM stdin
3	three
\.
SELECT count(*) AS n FROM tools_t;
\copy (SELECT id FROM tools_t ORDER BY id) TO stdout
SELECT $1::int + 1 AS bound \bind 41 \g
SELECT 'a' AS x; SELECT 'b' AS y;
"""


@pytest.fixture(params=["session", "transaction"])
def px(request: pytest.FixtureRequest) -> ProxyProcess:
    proxy: ProxyProcess = request.getfixturevalue("proxy" if request.param == "session" else "proxy_tx")
    return proxy


def test_psql_script(px: ProxyProcess, pg_bin: Path, tmp_path: Path) -> None:
    script = tmp_path / "script.sql"
    # One transaction: in transaction mode the temp table must live on one server connection.
    script.write_text(PSQL_SCRIPT if px.pool_mode == "session" else "BEGIN;\n" + PSQL_SCRIPT + "COMMIT;\n")
    out = subprocess.run(
        [str(pg_bin / "psql"), "-X", "-q", "-A", "-t", "-d", px.dsn(), "-f", str(script)],
        capture_output=True, text=True, timeout=60,
    )
    lines = out.stdout.splitlines()
    if px.pool_mode == "session":
        assert "division by zero" in out.stderr
        assert lines == ["one", "two", "after error", "3", "1", "2", "3", "42", "a", "b"]
    else:  # the error aborts the transaction block: the rest of it is refused with 25P02
        assert "division by zero" in out.stderr and "current transaction is aborted" in out.stderr
        assert lines[:2] == ["one", "two"]


def test_psql_variables_and_errors(px: ProxyProcess, pg_bin: Path) -> None:
    out = subprocess.run(
        [str(pg_bin / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", px.dsn(),
         "-c", "SELECT current_database(), current_user", "-c", "SELECT * FROM missing_tbl"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert out.stdout.strip() == "postgres|postgres"
    assert 'relation "missing_tbl" does not exist' in out.stderr


@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_pgbench(px: ProxyProcess, pg_bin: Path, protocol: str, pg_dsn: str) -> None:
    init = subprocess.run([str(pg_bin / "pgbench"), "-i", "-s", "1", "-q", "-I", "dtgp", pg_dsn],
                          capture_output=True, text=True, timeout=120) if protocol == "simple" and \
        px.pool_mode == "session" else None
    assert init is None or init.returncode == 0, init.stderr if init else ""
    out = subprocess.run(
        [str(pg_bin / "pgbench"), "-n", "-c", "4", "-j", "2", "-t", "50", "-M", protocol, px.dsn()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"number of transactions actually processed: 200/200", out.stdout), out.stdout
    assert "number of failed transactions: 0" in out.stdout
