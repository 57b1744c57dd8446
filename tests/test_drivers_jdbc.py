"""JDBC (Debian's pgjdbc) direct vs through the proxy, both pool modes, text and binary.

tests/drivers/java/DriverCases.java is compiled at test time and run once (one JVM) against nine
targets: direct, session proxy and transaction proxy (2 server connections, so that each new
client reuses one a previous client prepared statements on), each with prepareThreshold 0 (never a
named statement: text), 5 (the default: the 6th execution becomes a named statement and switches
to binary results) and -1 (forceBinary: every statement named, binary). Every case's observations
(update counts, column labels, type names, result formats, rows, SQLSTATEs) must equal direct's.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.drivers_harness import differences, small_tx_proxy, targets
from tests.fix_proxy import ProxyProcess

SOURCE = Path(__file__).resolve().parent / "drivers" / "java" / "DriverCases.java"
JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
MODES = {"text": 0, "default": 5, "binary": -1}
# Compared separately below: large objects (text mode, both pools) and pgml (not a direct Postgres feature).
CORE = ["types", "multi_statement", "prepared_past_threshold", "batch_insert", "fetchsize_cursor",
        "transactions", "errors", "metadata"]

pytestmark = pytest.mark.skipif(shutil.which("javac") is None or not JAR.exists(),
                                reason="needs default-jdk-headless and libpostgresql-jdbc-java (.ci/run)")


@pytest.fixture(scope="module")
def small_tx(proxy_factory: Any) -> ProxyProcess:
    return small_tx_proxy(proxy_factory)


@pytest.fixture(scope="module")
def reports(pg_dsn: str, proxy: ProxyProcess, small_tx: ProxyProcess, tmp_path_factory: Any) -> Any:
    build = tmp_path_factory.mktemp("jdbc")
    subprocess.run(["javac", "-cp", str(JAR), "-d", str(build), str(SOURCE)], check=True, timeout=180)
    found: dict[str, Any] = {}
    # Two JVMs, one after the other: the second's clients reuse server connections the first's
    # clients prepared statements on, as an application's restart or a second instance would.
    for run in ("", "again-"):
        args = []
        for target, (host, port) in targets(pg_dsn, proxy, small_tx).items():
            for mode, threshold in MODES.items():
                url = f"jdbc:postgresql://{host}:{port}/postgres?user=postgres&prepareThreshold={threshold}"
                args.append(f"{run}{target}/{mode}={url}")
        out = subprocess.run(["java", "-cp", f"{JAR}:{build}", "DriverCases", "drv_jdbc", "all", *args],
                             check=True, capture_output=True, text=True, timeout=300)
        found.update(json.loads(out.stdout))
    return found


@pytest.mark.parametrize("mode", list(MODES))
def test_jdbc_session_mode_matches_direct(reports: Any, mode: str) -> None:
    for run in ("", "again-"):
        diff = differences(reports[f"direct/{mode}"], reports[f"{run}session/{mode}"], CORE)
        assert not diff, diff


@pytest.mark.parametrize("mode", ["text", "default", "binary"])
def test_jdbc_transaction_mode_matches_direct(reports: Any, mode: str) -> None:
    for run in ("", "again-"):
        diff = differences(reports[f"direct/{mode}"], reports[f"{run}transaction/{mode}"], CORE)
        assert not diff, f"{run}run:\n{diff}"


@pytest.mark.parametrize("pool", ["session", "transaction"])
def test_jdbc_large_objects(reports: Any, pool: str) -> None:
    assert reports["direct/text"]["large_object"] == ["read large object bytes size 18"]
    diff = differences(reports["direct/text"], reports[f"{pool}/text"], ["large_object"])
    assert not diff, diff


@pytest.mark.parametrize("pool", ["session", "transaction"])
def test_jdbc_pgml_matches_psycopg(reports: Any, pool: str, proxy: ProxyProcess,
                                   small_tx: ProxyProcess) -> None:
    """pgml calls through JDBC give what psycopg gets through the same proxy (text results)."""
    px = proxy if pool == "session" else small_tx
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        found = [conn.execute("SELECT pgml.cosine_similarity(%s::float4[], ARRAY[1, 2, 4]::float4[])",
                              [[1.0, 2.0, 3.0 + i]]).fetchone() for i in range(7)]
        sims = [row[0] for row in found if row]
    got = reports[f"{pool}/text"]["pgml"]
    rows = [line.split(" | ")[1] for line in got if line.startswith("row")]
    assert got[0] == "cols sim:float4:0" and len(rows) == 7, got
    assert all(math.isclose(float(r), s, rel_tol=1e-6) for r, s in zip(rows, sims, strict=True)), rows
