"""What a small `pgml.train` costs end to end through the proxy (issue 15: fits in a worker process).

An iris-sized table (150 rows, 4 features, 3 classes) is trained with `linear`,
`random_forest` and `xgboost`, `--runs` times each after one warm-up, through a real proxy in
front of a real Postgres. The figures are the median and the p90 wall time of the statement,
the first (cold) call apart, and the load average at the start and the end. The development
machine is shared and its load swings, so a before/after runs both in the same window:
`--baseline ROOT` starts a second proxy from another checkout of the code (`git archive` of
the commit before, say) on the same Postgres, and the two are called in turn, call by call.

    python -m benchmarks.train_small --runs 15 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from testing.postgres import start_postgres
from testing.proxy import TEST_CONFIG, ProxyProcess, _wait_ready

ALGORITHMS = ("linear", "random_forest", "xgboost")
IRIS = (
    "CREATE TABLE iris AS SELECT (i % 7)::float8 + random() AS a, (i % 5)::float8 AS b,"
    " (i % 11)::float8 * random() AS c, random() AS d, i % 3 AS species"
    " FROM generate_series(1, 150) i"
)


def _proxy(upstream: str, root: Path) -> ProxyProcess:
    """`proxy.main` of the checkout at `root`, with the test configuration."""
    from testing.postgres import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(root)}
    log_path = Path(tempfile.mkdtemp(prefix="pgml-bench-train-")) / "proxy.log"
    cmd = [sys.executable, "-m", "proxy.main", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
           "--pool-mode", "session", "--config", str(TEST_CONFIG)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    proxy = ProxyProcess("127.0.0.1", port, upstream, proc, log_path, env)
    _wait_ready(proxy)
    return proxy


def _time(conn: psycopg.Connection[Any], algorithm: str, project: str) -> float:
    start = time.perf_counter()
    conn.execute(
        "SELECT * FROM pgml.train(%s, 'classification', 'iris', 'species', algorithm => %s)",
        (project, algorithm),
    ).fetchall()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--baseline", type=Path, help="another checkout's root, called in turn")
    args = parser.parse_args()
    roots = {"this": Path(__file__).resolve().parents[1]}
    if args.baseline is not None:
        roots["baseline"] = args.baseline
    tmp = Path(tempfile.mkdtemp(prefix="pgml-bench-train-"))
    tmp.chmod(0o755)  # the Postgres user must reach its data folder
    server = start_postgres(tmp / "pg")
    proxies: dict[str, ProxyProcess] = {}
    try:
        for name, root in roots.items():
            proxies[name] = _proxy(server.dsn, root)
        conns = {name: psycopg.connect(p.dsn(), autocommit=True) for name, p in proxies.items()}
        conns["this"].execute(IRIS)
        where = ", ".join(f"{name}: {root}" for name, root in roots.items())
        print(f"load average at the start {os.getloadavg()[0]:.2f}; {where}")
        for algorithm in ALGORITHMS:
            cold = {name: _time(conn, algorithm, f"bench_{name}") for name, conn in conns.items()}
            times: dict[str, list[float]] = {name: [] for name in conns}
            for _ in range(args.runs):
                for name, conn in conns.items():
                    times[name].append(_time(conn, algorithm, f"bench_{name}"))
            for name, each in times.items():
                each.sort()
                p90 = each[min(len(each) - 1, int(0.9 * len(each)))]
                median = statistics.median(each)
                print(
                    f"{algorithm:14s} {name:8s} first {cold[name] * 1000:7.1f} ms"
                    f"  median {median * 1000:7.1f} ms  p90 {p90 * 1000:7.1f} ms  ({args.runs} runs)"
                )
        for conn in conns.values():
            conn.close()
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        for proxy in proxies.values():
            proxy.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
