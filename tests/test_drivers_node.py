"""node-postgres (npm `pg`) direct vs through the proxy, both pool modes, text and binary results.

tests/drivers/node/cases.js runs its cases (simple and multi-statement queries, named prepared
queries past re-execution, transactions with savepoints, errors, `binary: true` results, a
pg.Pool of 3 running 12 concurrent named queries) against direct Postgres, the session proxy and
a transaction proxy of 2 server connections, twice (two node processes one after the other).
Command tags, row counts, field names, type OIDs, formats and rows must equal direct's.
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

NODE_DIR = Path(__file__).resolve().parent / "drivers" / "node"
CORE = ["types", "simple_multi", "named_prepared", "transactions", "errors", "pool"]

HAVE_PG = (NODE_DIR / "node_modules" / "pg").is_dir()
pytestmark = pytest.mark.skipif(shutil.which("node") is None or not HAVE_PG,
                                reason="needs node and `npm ci` in tests/drivers/node (.ci/run does both)")


@pytest.fixture(scope="module")
def small_tx(proxy_factory: Any) -> ProxyProcess:
    return small_tx_proxy(proxy_factory)


@pytest.fixture(scope="module")
def reports(pg_dsn: str, proxy: ProxyProcess, small_tx: ProxyProcess) -> Any:
    found: dict[str, Any] = {}
    for run in ("", "again-"):
        args = [f"{run}{name}=postgresql://postgres@{host}:{port}/postgres"
                for name, (host, port) in targets(pg_dsn, proxy, small_tx).items()]
        out = subprocess.run(["node", "cases.js", "drv_node", *args], cwd=NODE_DIR, check=True,
                             capture_output=True, text=True, timeout=300)
        found.update(json.loads(out.stdout))
    return found


@pytest.mark.parametrize("pool", ["session", "transaction"])
def test_node_pg_matches_direct(reports: Any, pool: str) -> None:
    assert reports["direct"]["pool"][0] == [i * 2 for i in range(12)]
    for run in ("", "again-"):
        diff = differences(reports["direct"], reports[f"{run}{pool}"], CORE)
        assert not diff, f"{run}run:\n{diff}"


@pytest.mark.parametrize("pool", ["session", "transaction"])
def test_node_pg_pgml_matches_psycopg(reports: Any, pool: str, proxy: ProxyProcess,
                                      small_tx: ProxyProcess) -> None:
    px = proxy if pool == "session" else small_tx
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        want = [conn.execute("SELECT pgml.cosine_similarity(%s::float4[], ARRAY[1, 2, 4]::float4[])",
                             [[1.0, 2.0, 3.0 + i]]).fetchone() for i in range(6)]
    got = reports[pool]["pgml"]
    assert all(r["fields"] == [["sim", 700, "text"]] for r in got), got
    sims = [float(r["rows"][0][0]) for r in got]
    assert all(math.isclose(g, w[0], rel_tol=1e-6) for g, w in zip(sims, want, strict=True) if w), sims
