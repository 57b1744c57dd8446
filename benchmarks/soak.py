"""Soak: many clients for a long while through pgml-proxy, with an upstream restart midway.

Run: ``.venv/bin/python -m benchmarks.soak [--clients 200] [--duration 600] [--pool-mode
transaction] [--pool-size 40] [--think 0.1] [--train-every 30]``.
It starts its own Postgres (testing/postgres.py) and the real proxy CLI in front of it, trains
a small regression project, then runs `--clients` clients (psycopg, async), each looping
over a mix of statements with `--think` seconds between them: pass-through SELECTs, a
one-row `pgml.embed` (all-MiniLM-L6-v2), a one-row `pgml.predict`; and one client trains
the project again every `--train-every` seconds. Halfway through, Postgres is stopped
(fast shutdown) and started again. A client whose connection broke reconnects.

Reported: statements and p50/p99 latency per kind; errors by SQLSTATE, split into those
in flight at the restart (from the stop until the upstream accepts again, plus a grace of
`--grace` seconds: allowed) and all others (must be none); the proxy's RSS after warm-up
and at the end (growth must stay under 5%). Results go to benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from benchmarks.common import machine_info, markdown_table, stop_process, write_results
from testing.postgres import PgServer, free_port, start_postgres

REPO = Path(__file__).resolve().parent.parent
KINDS = {  # kind -> (weight, SQL)
    "passthrough": (6, "SELECT count(*) FROM soak_data WHERE x1 < 50"),
    "embed": (1, "SELECT pgml.embed('all-MiniLM-L6-v2', 'a soak test sentence ' || (random() * 100)::int)"),
    "predict": (3, "SELECT pgml.predict('soak', ARRAY[random() * 100, random() * 7])"),
}
TRAIN = "SELECT * FROM pgml.train('soak', 'regression', 'soak_data', 'y', algorithm => 'linear')"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, args: argparse.Namespace, dsn: str) -> None:
        self.args, self.dsn = args, dsn
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.at_restart: Counter[str] = Counter()
        self.restart_window = (float("inf"), float("inf"))
        self.samples: list[str] = []
        self.end = 0.0

    def _record_error(self, kind: str, exc: BaseException, started: float) -> None:
        """Count an error; in flight at the restart when its statement (or connect) began
        before the upstream was back (plus the grace) and ended after the stop."""
        state = getattr(exc, "sqlstate", None) or f"no SQLSTATE ({type(exc).__name__})"
        lo, hi = self.restart_window
        if started <= hi + self.args.grace and time.monotonic() >= lo:
            self.at_restart[state] += 1
        else:
            self.errors[state] += 1
            if len(self.samples) < 10:
                self.samples.append(f"{kind}: {state}: {str(exc).strip()[:200]}")

    async def _statement(self, conn: psycopg.AsyncConnection[Any], kind: str, sql: str) -> None:
        started = time.perf_counter()
        await (await conn.execute(sql)).fetchall()
        self.latency[kind].append(time.perf_counter() - started)

    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds = list(KINDS)
        weights = [KINDS[k][0] for k in kinds]
        conn: psycopg.AsyncConnection[Any] | None = None
        while time.monotonic() < self.end:
            kind = rng.choices(kinds, weights)[0]
            began = time.monotonic()
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                await self._statement(conn, kind, KINDS[kind][1])
            except (psycopg.Error, OSError) as exc:
                self._record_error(kind, exc, began)
                if conn is not None and (conn.closed or conn.broken):
                    await conn.close()
                    conn = None
                await asyncio.sleep(0.2)  # a broken upstream: do not spin
            await asyncio.sleep(rng.uniform(0, 2 * self.args.think))
        if conn is not None:
            await conn.close()

    async def trainer(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        while time.monotonic() + self.args.train_every < self.end:
            await asyncio.sleep(self.args.train_every)
            began = time.monotonic()
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                await self._statement(conn, "train", TRAIN)
            except (psycopg.Error, OSError) as exc:
                self._record_error("train", exc, began)
                if conn is not None and (conn.closed or conn.broken):
                    await conn.close()
                    conn = None
        if conn is not None:
            await conn.close()

    async def restarter(self, pg: PgServer, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        stopped = time.monotonic()
        self.restart_window = (stopped, float("inf"))
        await asyncio.get_running_loop().run_in_executor(None, pg.restart)
        self.restart_window = (stopped, time.monotonic())

    async def run(self, pg: PgServer, proxy_pid: int) -> dict[str, Any]:
        start = time.monotonic()
        self.end = start + self.args.duration
        tasks = [asyncio.ensure_future(self.client(i)) for i in range(self.args.clients)]
        tasks.append(asyncio.ensure_future(self.trainer()))
        tasks.append(asyncio.ensure_future(self.restarter(pg, start + self.args.duration / 2)))
        await asyncio.sleep(min(10.0, self.args.duration / 10))  # warm-up: every client connected
        rss_start = _rss_mb(proxy_pid)
        await asyncio.gather(*tasks)
        rss_end = _rss_mb(proxy_pid)
        kinds = {
            kind: {
                "statements": len(lat),
                "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2) if lat else None,
                "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2) if lat else None,
            }
            for kind, lat in sorted(self.latency.items())
        }
        lo, hi = self.restart_window
        return {
            "kinds": kinds,
            "errors": dict(self.errors),
            "errors_at_restart": dict(self.at_restart),
            "error_samples": self.samples,
            "restart": {"at_s": round(lo - start, 1), "upstream_down_s": round(hi - lo, 2)},
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_growth": round(rss_end / rss_start - 1, 4) if rss_start else None,
        }


def _start_proxy(
    args: argparse.Namespace, upstream: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = workdir / "soak.toml"
    config.write_text(
        f"[proxy]\npool_size = {args.pool_size}\npool_timeout = 30.0\nlog_level = \"WARNING\"\n\n[runtime]\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(workdir / "proxy.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.main", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
         "--pool-mode", args.pool_mode, "--config", str(config)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited: {(workdir / 'proxy.log').read_text()[-2000:]}")
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return proc, dsn
        except psycopg.Error:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the proxy did not start within 120 s")


def _prepare(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE soak_data AS SELECT (i % 100)::float8 AS x1, (i % 7)::float8 AS x2,"
            " (i % 100 * 2 + i % 7)::float8 AS y FROM generate_series(1, 5000) i"
        )
        conn.execute(TRAIN)
        conn.execute(KINDS["embed"][1])  # the model is loaded before the clock starts
        conn.execute(KINDS["predict"][1])


def _markdown(args: argparse.Namespace, res: dict[str, Any]) -> str:
    rows = [[k, v["statements"], v["p50_ms"], v["p99_ms"]] for k, v in res["kinds"].items()]
    errs = [[state, n, "no"] for state, n in res["errors"].items()]
    errs += [[state, n, "yes (in flight at the restart)"] for state, n in res["errors_at_restart"].items()]
    return "\n\n".join([
        f"# Soak ({args.clients} clients, {args.duration:.0f} s, {args.pool_mode} pooling, pool "
        f"{args.pool_size}, think {args.think} s, upstream restarted at {res['restart']['at_s']} s, "
        f"down {res['restart']['upstream_down_s']} s)",
        markdown_table(["kind", "statements", "p50 ms", "p99 ms"], rows),
        markdown_table(["SQLSTATE", "count", "allowed"], errs or [["none", 0, ""]]),
        f"Proxy RSS: {res['rss_start_mb']} MB after warm-up, {res['rss_end_mb']} MB at the end "
        f"(growth {res['rss_growth']:.2%}).",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--pool-mode", default="transaction", choices=["session", "transaction"])
    ap.add_argument("--pool-size", type=int, default=40)
    ap.add_argument("--think", type=float, default=0.1, help="mean seconds between a client's statements")
    ap.add_argument("--train-every", type=float, default=30.0)
    ap.add_argument("--grace", type=float, default=3.0, help="seconds after the restart still counted in it")
    ap.add_argument("--name", default="soak")
    args = ap.parse_args()
    if args.pool_mode == "session":
        args.pool_size = max(args.pool_size, args.clients + 5)
    with tempfile.TemporaryDirectory(prefix="pgml-soak-") as tmp:
        workdir = Path(tmp)
        if os.geteuid() == 0:
            os.chmod(workdir, 0o755)
        pg = start_postgres(workdir / "pg", conf={"max_connections": str(max(300, args.pool_size + 50))})
        proxy, dsn = _start_proxy(args, pg.dsn, workdir)
        try:
            _prepare(dsn)
            res = asyncio.run(Soak(args, dsn).run(pg, proxy.pid))
        finally:
            stop_process(proxy, timeout=20)
            pg.stop()
    data = {"machine": machine_info(), "args": vars(args), **res}
    json_path, _ = write_results(args.name, data, _markdown(args, res))
    print(_markdown(args, res))
    print(f"results: {json_path}")


if __name__ == "__main__":
    main()
