"""How cost grows (issue 13): rows/s and the proxy's peak memory by table size, and 2,000 clients.

Run: ``.venv/bin/python -m benchmarks.scale [--predict-rows 1000 10000 100000 1000000]
[--embed-rows 1000 10000] [--idle 1900] [--clients 100] [--duration 15]``.

(a) Table size. One Postgres, the real proxy (session pooling), and:
    - ``SELECT pgml.predict('bench xgb', ARRAY[f0, ..., f15]) FROM t_<n>``: the XGBoost model of
      benchmarks/predict.py (its `setup`: trained through TabularRuntime on 10,000 rows), tables
      of n rows made in Postgres from those rows;
    - ``SELECT id, pgml.embed('all-MiniLM-L6-v2', body) FROM docs_<n>``: the sentences of
      benchmarks/embed.py, as benchmarks/embed_table.py.
    Each statement is read by psycopg in binary, streamed (the client keeps one row). Rows/s should
    be flat in n; the proxy's peak RSS during each statement (VmHWM, reset before it through
    /proc/PID/clear_refs, and VmRSS sampled every 20 ms) should be bounded by the planner's chunk
    (`planner.chunk_rows` rows), not by n.
(b) Clients. The proxy in transaction pooling (pool_size 20) in front of a Postgres with
    max_connections 100: ``pgbench -S -c <clients>`` alone, then with `--idle` more clients
    connected and logged in (psycopg connections that send nothing), then alone again, in the
    order A B B A; TPS with the idle clients as a share of TPS without, and the proxy's RSS
    growth per idle client.
Results: benchmarks/results/scale.{json,md}, with the machine, the load average and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import machine_info, markdown_table, median, write_results
from benchmarks.embed import corpus_sentences
from benchmarks.passthrough import pgbench
from benchmarks.predict import N_FEATURES, PROJECT, setup
from core.settings import PlannerSettings
from testing.postgres import PgServer, start_postgres
from testing.proxy import TEST_CONFIG, ProxyProcess, start_proxy

MODEL = "all-MiniLM-L6-v2"
TRAIN_ROWS = 10_000


# --- the proxy's memory ------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, float]]:
    """The process's peak RSS over the block: VmHWM after resetting it (Linux >= 4.0, our own
    process) and the highest of VmRSS samples every 20 ms (in case the reset is refused)."""
    out: dict[str, float] = {"rss_before_mb": rss_mb(pid)}
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        out["hwm_reset"] = 1.0
    except OSError:
        out["hwm_reset"] = 0.0
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb(pid, "VmRSS"))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        out["peak_rss_sampled_mb"] = peak[0] / 1024
        out["vmhwm_mb"] = _status_kb(pid, "VmHWM") / 1024
        out["rss_after_mb"] = rss_mb(pid)


def _stream(dsn: str, sql: str, expected: int) -> dict[str, float]:
    """Run `sql` streamed (one row held by the client), binary; rows/s and time to the first row."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        start = time.perf_counter()
        first = 0.0
        count = 0
        for _row in cur.stream(sql):
            if not count:
                first = time.perf_counter() - start
            count += 1
        total = time.perf_counter() - start
    if count != expected:
        raise RuntimeError(f"{sql}: {count} rows, expected {expected}")
    return {"seconds": total, "rows_per_s": count / total, "first_row_s": first}


def _measured(proxy: ProxyProcess, sql: str, rows: int) -> dict[str, float]:
    with peak_rss(proxy.pid) as mem:
        figures = _stream(proxy.dsn(), sql, rows)
    return {**figures, **mem}


# --- (a) table size ----------------------------------------------------------------------------


def _predict_tables(dsn: str, sizes: list[int], tmp: Path) -> None:
    """bench_rows (TRAIN_ROWS rows) and the model from benchmarks.predict.setup, then t_<n> of n
    rows repeated from bench_rows, made inside Postgres (a 10^6-row COPY from Python would take
    minutes on this machine and measure the loader, not the proxy)."""
    asyncio.run(setup(dsn, TRAIN_ROWS, tmp / "model.ubj"))
    cols = ", ".join(f"f{i}" for i in range(N_FEATURES))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in sizes:
            conn.execute(
                f"CREATE TABLE t_{n} AS SELECT {cols} FROM"
                f" (SELECT {cols}, row_number() OVER () AS k FROM bench_rows) b,"
                f" generate_series(0, {(n - 1) // TRAIN_ROWS}) g"
                f" WHERE g * {TRAIN_ROWS} + k <= {n}"
            )
            conn.execute(f"VACUUM ANALYZE t_{n}")


def _embed_tables(dsn: str, sizes: list[int]) -> None:
    texts = corpus_sentences(max(sizes))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in sizes:
            conn.execute(f"CREATE TABLE docs_{n} (id int PRIMARY KEY, body text)")
            with conn.cursor().copy(f"COPY docs_{n} (id, body) FROM STDIN") as copy:
                for i, t in enumerate(texts[:n], start=1):
                    copy.write_row((i, t))


def table_size(pg: PgServer, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    _predict_tables(pg.dsn, args.predict_rows, tmp)
    _embed_tables(pg.dsn, args.embed_rows)
    # MiniLM preloaded: its ONNX export is made at start, so the statements measure the steady
    # state, not the torch-while-exporting start (benchmarks/coldstart.py measures that).
    config = tmp / "config.toml"
    preload = f'[runtime]\npreload = ["embed:{MODEL}"]\n'
    config.write_text(TEST_CONFIG.read_text().replace("[runtime]\n", preload, 1))
    proxy = start_proxy(pg.dsn, "session", config=config, pool_size=20)
    rows: list[dict[str, Any]] = []
    array = "ARRAY[" + ", ".join(f"f{i}" for i in range(N_FEATURES)) + "]"
    try:
        # Warm both models and their imports first: the figures are the steady state.
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            smallest = min(args.predict_rows)
            conn.execute(f"SELECT pgml.predict('{PROJECT}', {array}) FROM t_{smallest} LIMIT 10")
            conn.execute("SELECT pgml.embed(%s, 'warm up')", (MODEL,))
        rows.append({"run": "idle, models loaded", "rss_mb": rss_mb(proxy.pid)})
        for n in args.predict_rows:
            sql = f"SELECT pgml.predict('{PROJECT}', {array}) FROM t_{n}"
            rows.append({"run": "predict", "rows": n, **_measured(proxy, sql, n)})
            print(rows[-1], file=sys.stderr, flush=True)
        for n in args.embed_rows:
            sql = f"SELECT id, pgml.embed('{MODEL}', body) FROM docs_{n}"
            rows.append({"run": "embed", "rows": n, **_measured(proxy, sql, n)})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        proxy.stop()
    return rows


# --- (b) clients -----------------------------------------------------------------------------


def _connect_idle(dsn: str, n: int) -> list[psycopg.Connection[Any]]:
    """n logged-in clients that then send nothing (each one's startup and login completes)."""
    conns: list[psycopg.Connection[Any]] = []
    for _ in range(n):
        conns.append(psycopg.connect(dsn, autocommit=True))
    return conns


def clients(pg: PgServer, args: argparse.Namespace) -> dict[str, Any]:
    init = [str(pg.bin_dir / "pgbench"), "-i", "-q", "-s", "10", pg.dsn]
    subprocess.run(init, check=True, capture_output=True)
    limit = args.idle + args.clients + 100
    proxy = start_proxy(pg.dsn, "transaction", pool_size=20, max_client_connections=limit)
    runs: list[dict[str, Any]] = []
    out: dict[str, Any] = {"max_client_connections": limit, "pool_size": 20, "upstream_max_connections": 100}
    try:
        pgbench(pg, proxy.dsn(), args.clients, 3)  # warm: the pool, the proxy's allocations
        out["rss_warm_mb"] = rss_mb(proxy.pid)

        def measure(label: str) -> None:
            result = pgbench(pg, proxy.dsn(), args.clients, args.duration)
            runs.append({"run": label, **result, "rss_mb": rss_mb(proxy.pid), "load": os.getloadavg()[0]})
            print(runs[-1], file=sys.stderr, flush=True)

        measure("alone")
        before = rss_mb(proxy.pid)
        start = time.perf_counter()
        idle = _connect_idle(proxy.dsn(), args.idle)
        out["idle_connect_s"] = time.perf_counter() - start
        time.sleep(2)
        after = rss_mb(proxy.pid)
        out.update(rss_before_idle_mb=before, rss_with_idle_mb=after,
                   rss_per_idle_client_kb=(after - before) * 1024 / args.idle)
        try:
            measure(f"with {args.idle} idle")
            measure(f"with {args.idle} idle")
            # The idle clients are still there and still logged in: each answers a query.
            for conn in idle[:: max(1, len(idle) // 20)]:
                conn.execute("SELECT 1").fetchone()
        finally:
            for conn in idle:
                conn.close()
        measure("alone")
        out["proxy_log_errors"] = [line for line in proxy.log().splitlines() if " ERROR " in line][:5]
    finally:
        proxy.stop()
    alone = [r["tps"] for r in runs if r["run"] == "alone"]
    busy = [r["tps"] for r in runs if r["run"] != "alone"]
    out.update(runs=runs, tps_alone=median(alone), tps_with_idle=median(busy),
               ratio=median(busy) / median(alone))
    return out


# --- report ----------------------------------------------------------------------------------


def _markdown(info: dict[str, Any], args: argparse.Namespace, sizes: list[dict[str, Any]],
              scale: dict[str, Any] | None) -> str:
    parts = [f"# scale ({info['date_utc']}, {info['cpu']}, {info['cpus']} CPUs)",
             f"Command: `{info['command']}`. Load average (1 min) {info['load_start']:.2f} at the start, "
             f"{info['load_end']:.2f} at the end: 2 CPUs shared with other sessions running tests, so "
             "every figure is noisy."]
    if sizes:
        idle = next(r["rss_mb"] for r in sizes if r["run"].startswith("idle"))
        table = [[r["run"], f"{r['rows']:,}", r["rows_per_s"], r["seconds"], r["first_row_s"] * 1000,
                  r["vmhwm_mb"] if r["hwm_reset"] else "", r["peak_rss_sampled_mb"], r["rss_after_mb"]]
                 for r in sizes if "rows" in r]
        parts += [
            "## (a) rows/s and peak RSS by table size",
            f"`SELECT pgml.predict('{PROJECT}', ARRAY[f0..f{N_FEATURES - 1}]) FROM t_<n>` (XGBoost, "
            f"100 trees of depth 6, trained on {TRAIN_ROWS:,} rows by benchmarks/predict.py's setup) and "
            f"`SELECT id, pgml.embed('{MODEL}', body) FROM docs_<n>`, through the proxy (session pooling), "
            "streamed by psycopg in binary. Peak RSS is the proxy's during the statement (VmHWM reset "
            f"before it; VmRSS sampled every 20 ms). The planner fetches {info['chunk_rows']:,} rows per "
            f"chunk (`planner.chunk_rows`). The proxy idle with both models loaded: {idle:.0f} MB.",
            markdown_table(["statement", "rows", "rows/s", "seconds", "first row ms", "peak RSS MB (VmHWM)",
                            "peak RSS MB (sampled)", "RSS after MB"], table),
        ]
    if scale is not None:
        table = [[r["run"], r["tps"], r["latency_ms"], int(r["failed"]), r["rss_mb"], r["load"]]
                 for r in scale["runs"]]
        parts += [
            "## (b) 2,000 clients, transaction pooling",
            f"`pgbench -S -M simple -c {args.clients} -j 2 -T {args.duration}` through the proxy (pool_size "
            f"{scale['pool_size']}, upstream max_connections {scale['upstream_max_connections']}, "
            f"max_client_connections {scale['max_client_connections']}), alone and with {args.idle} more "
            f"clients connected and logged in (psycopg, idle; connecting them took "
            f"{scale['idle_connect_s']:.1f} s), in the order A B B A.",
            markdown_table(["run", "TPS", "latency ms", "failed", "proxy RSS MB", "load avg"], table),
            f"TPS with the idle clients / alone (medians): **{scale['ratio']:.2f}** "
            f"({scale['tps_with_idle']:,.0f} / {scale['tps_alone']:,.0f}; target >= 0.9). Proxy RSS "
            f"{scale['rss_before_idle_mb']:.1f} MB before the idle clients connected, "
            f"{scale['rss_with_idle_mb']:.1f} MB after: **{scale['rss_per_idle_client_kb']:.1f} KB per idle "
            "client**.",
        ]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict-rows", type=int, nargs="*", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--embed-rows", type=int, nargs="*", default=[1000, 10_000])
    parser.add_argument("--idle", type=int, default=1900)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--skip-clients", action="store_true", help="only (a)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="pgml-bench-scale-"))
    tmp.chmod(0o755)
    load_start = os.getloadavg()[0]
    # Upstream connections: the proxy's pool of 20, the runtime's own pool, pgbench -i.
    pg = start_postgres(tmp / "pg", conf={"max_connections": "100"})
    try:
        sizes = table_size(pg, args, tmp) if args.predict_rows or args.embed_rows else []
        scale = None if args.skip_clients else clients(pg, args)
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    info = machine_info(pgbench=[str(pg.bin_dir / "pgbench"), "--version"])
    info.update(load_start=load_start, load_end=os.getloadavg()[0], chunk_rows=PlannerSettings().chunk_rows,
                command=".venv/bin/python -m benchmarks.scale " + shlex.join(sys.argv[1:]))
    write_results("scale", {"machine": info, "args": vars(args), "table_size": sizes, "clients": scale},
                  _markdown(info, args, sizes, scale))


if __name__ == "__main__":
    main()
