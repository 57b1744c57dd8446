"""Go (database/sql + Debian's lib/pq) direct vs through the proxy, both pool modes.

tests/drivers/go/cases.go is built at test time (GO111MODULE=off against Debian's source tree
in /usr/share/gocode) and runs its cases (types, Prepare'd statements re-executed, transactions,
COPY FROM STDIN through pq.CopyIn, errors, database/sql's pool of 3 under 12 goroutines) against
direct Postgres, the session proxy and a transaction proxy of 2 server connections, each with
lib/pq's default text parameters and with `binary_parameters=yes` (lib/pq's only binary choice;
its results are text either way). Column names, type names, rows, rows affected and SQLSTATEs
must equal direct's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.drivers_harness import differences, small_tx_proxy, targets
from tests.fix_proxy import ProxyProcess

SOURCE = Path(__file__).resolve().parent / "drivers" / "go" / "cases.go"
GOPATH = Path("/usr/share/gocode")  # Debian's golang-github-lib-pq-dev
MODES = {"text": "", "binary": "&binary_parameters=yes"}
CORE = ["types", "prepared", "transactions", "copy_in", "errors", "pool"]

pytestmark = pytest.mark.skipif(shutil.which("go") is None or not (GOPATH / "src/github.com/lib/pq").is_dir(),
                                reason="needs golang-go and golang-github-lib-pq-dev (.ci/run)")


@pytest.fixture(scope="module")
def small_tx(proxy_factory: Any) -> ProxyProcess:
    return small_tx_proxy(proxy_factory)


@pytest.fixture(scope="module")
def reports(pg_dsn: str, proxy: ProxyProcess, small_tx: ProxyProcess, tmp_path_factory: Any) -> Any:
    build = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOCACHE": str(build / "cache"),
           "GOFLAGS": ""}
    subprocess.run(["go", "build", "-o", str(build / "cases"), str(SOURCE)], env=env, check=True, timeout=300)
    found: dict[str, Any] = {}
    for run in ("", "again-"):
        args = [f"{run}{name}/{mode}=postgres://postgres@{host}:{port}/postgres?sslmode=disable{extra}"
                for name, (host, port) in targets(pg_dsn, proxy, small_tx).items()
                for mode, extra in MODES.items()]
        out = subprocess.run([str(build / "cases"), "drv_go", *args], check=True, capture_output=True,
                             text=True, timeout=300)
        found.update(json.loads(out.stdout))
    return found


@pytest.mark.parametrize("mode", list(MODES))
def test_lib_pq_session_mode_matches_direct(reports: Any, mode: str) -> None:
    for run in ("", "again-"):
        diff = differences(reports[f"direct/{mode}"], reports[f"{run}session/{mode}"], CORE)
        assert not diff, f"{run}run:\n{diff}"


@pytest.mark.parametrize("mode", list(MODES))
def test_lib_pq_transaction_mode_matches_direct(reports: Any, mode: str) -> None:
    for run in ("", "again-"):
        diff = differences(reports[f"direct/{mode}"], reports[f"{run}transaction/{mode}"], CORE)
        assert not diff, f"{run}run:\n{diff}"


def _psycopg_sims(px: ProxyProcess) -> list[float]:
    with psycopg.connect(px.dsn(), autocommit=True) as conn:
        rows = [conn.execute("SELECT pgml.cosine_similarity(%s::float4[], ARRAY[1, 2, 4]::float4[])",
                             [[1.0, 2.0, 3.0 + i]]).fetchone() for i in range(6)]
    return [r[0] for r in rows if r]


@pytest.mark.parametrize("pool", ["session", "transaction"])
@pytest.mark.parametrize("mode", ["text", "binary"])
def test_lib_pq_pgml_matches_psycopg(reports: Any, pool: str, mode: str, proxy: ProxyProcess,
                                     small_tx: ProxyProcess) -> None:
    want = _psycopg_sims(proxy if pool == "session" else small_tx)
    got = reports[f"{pool}/{mode}"]["pgml"]
    assert got[0] == "cols sim:FLOAT4", got
    sims = [float(line.split(" | ")[1]) for line in got if line.startswith("row")]
    assert len(sims) == len(want) == 6
    assert all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(sims, want, strict=True)), sims
