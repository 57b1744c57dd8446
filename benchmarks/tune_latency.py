"""Pass-through latency for another client while a `pgml.tune` trains (issue 11: within 2x of idle).

One client sends `SELECT 1` through the proxy (pass-through: no `pgml` in it) and, in the
same loop, straight to Postgres, a few hundred times a second: first with nothing else
running (idle), then while another connection's `pgml.tune` trains MiniLM on BBC News
(samples kept only between the first training step's INFO notice and the train summary:
the worker process is training), then idle again. The figures are p50 and p99 of each,
and their ratios to the idle run before; the direct-to-Postgres ratios beside them say
how much of a change is the machine (the training takes every core but one) rather than
the proxy.

    python -m benchmarks.tune_latency --rows 200 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from benchmarks.common import machine_info, markdown_table, write_results
from benchmarks.tune import CLASSES, load_bbc

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PAUSE_S = 0.002  # between probes: the probing client must not itself load the machine


def _probe(proxy: psycopg.Connection[Any], direct: psycopg.Connection[Any]) -> tuple[float, float, float]:
    """(time, proxy latency, direct latency) of one `SELECT 1` each, in seconds."""
    t0 = time.perf_counter()
    proxy.execute("SELECT 1").fetchall()
    t1 = time.perf_counter()
    direct.execute("SELECT 1").fetchall()
    t2 = time.perf_counter()
    time.sleep(PAUSE_S)
    return t0, t1 - t0, t2 - t1


def _sample(proxy_dsn: str, direct_dsn: str, seconds: float) -> list[tuple[float, float, float]]:
    with psycopg.connect(proxy_dsn, autocommit=True) as p, psycopg.connect(direct_dsn, autocommit=True) as d:
        for _ in range(50):  # warm: connections, plans, caches
            _probe(p, d)
        end = time.perf_counter() + seconds
        out: list[tuple[float, float, float]] = []
        while time.perf_counter() < end:
            out.append(_probe(p, d))
        return out


def _during_tune(proxy_dsn: str, direct_dsn: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """Probe while another connection's pgml.tune runs; keep the samples of its training phase."""
    marks: dict[str, float] = {}
    training = threading.Event()
    outcome: dict[str, Any] = {}

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        text = diag.message_primary or ""
        if text.startswith("{") and '"loss"' in text and "start" not in marks:
            marks["start"] = time.perf_counter()
            training.set()
        elif "train_runtime" in text:
            marks["end"] = time.perf_counter()

    def tune() -> None:
        try:
            with psycopg.connect(proxy_dsn, autocommit=True) as conn:
                conn.add_notice_handler(on_notice)
                started = time.perf_counter()
                outcome["row"] = conn.execute(
                    "SELECT * FROM pgml.tune('latency', 'text-classification', 'bench_bbc', NULL,"
                    f" '{MINILM}', %s::jsonb, test_sampling => 'last')",
                    (json.dumps(hyper),),
                ).fetchall()
                outcome["statement_s"] = time.perf_counter() - started
        except psycopg.Error as exc:
            outcome["error"] = str(exc)
        finally:
            training.set()

    worker = threading.Thread(target=tune)
    worker.start()
    samples: list[tuple[float, float, float]] = []
    with psycopg.connect(proxy_dsn, autocommit=True) as p, psycopg.connect(direct_dsn, autocommit=True) as d:
        training.wait()
        while worker.is_alive() and "end" not in marks:
            samples.append(_probe(p, d))
    worker.join()
    if "error" in outcome:
        raise RuntimeError(f"pgml.tune failed: {outcome['error']}")
    end = marks.get("end", float("inf"))
    kept = [s for s in samples if marks["start"] <= s[0] <= end]
    return {"samples": kept, "training_s": end - marks["start"], "statement_s": outcome["statement_s"]}


def _stats(samples: list[tuple[float, float, float]]) -> dict[str, float]:
    proxy = np.array([s[1] for s in samples]) * 1000
    direct = np.array([s[2] for s in samples]) * 1000
    return {
        "n": len(samples),
        "proxy_p50_ms": float(np.percentile(proxy, 50)),
        "proxy_p99_ms": float(np.percentile(proxy, 99)),
        "direct_p50_ms": float(np.percentile(direct, 50)),
        "direct_p99_ms": float(np.percentile(direct, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--note", default="", help="what else ran on the machine, for the result file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from testing.bbc import bbc
    from testing.postgres import start_postgres
    from testing.proxy import start_proxy

    rows = bbc(args.rows // len(CLASSES), CLASSES, chars=1000)
    base = Path(tempfile.mkdtemp(prefix="pgml-bench-tune-latency-"))
    base.chmod(0o755)
    pg = start_postgres(base / "pg")
    proxy = None
    try:
        proxy = start_proxy(pg.dsn, "session")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            load_bbc(conn, rows)
        hyper = {
            "training_args": {
                "num_train_epochs": args.epochs,
                "per_device_train_batch_size": 8,
                "per_device_eval_batch_size": 16,
                "learning_rate": 1e-4,
                "logging_steps": 1,
            },
            "max_seq_length": args.max_len,
        }
        idle = _stats(_sample(proxy.dsn(), pg.dsn, args.idle_s))
        tune = _during_tune(proxy.dsn(), pg.dsn, hyper)
        during = _stats(tune["samples"])
        after = _stats(_sample(proxy.dsn(), pg.dsn, args.idle_s))
    finally:
        if proxy is not None:
            proxy.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    ratios = {
        f"{side}_{q}_ratio": during[f"{side}_{q}_ms"] / idle[f"{side}_{q}_ms"]
        for side in ("proxy", "direct")
        for q in ("p50", "p99")
    }
    figures = {"idle": idle, "during_tune": during, "idle_after": after, **ratios}
    figures.update(training_s=tune["training_s"], tune_statement_s=tune["statement_s"])
    table = markdown_table(
        ["SELECT 1", "n", "proxy p50 ms", "proxy p99 ms", "direct p50 ms", "direct p99 ms"],
        [
            [name, s["n"], s["proxy_p50_ms"], s["proxy_p99_ms"], s["direct_p50_ms"], s["direct_p99_ms"]]
            for name, s in (("idle", idle), ("while pgml.tune trains", during), ("idle after", after))
        ],
    )
    md = (
        f"# tune_latency: pass-through SELECT 1 while pgml.tune trains MiniLM ({len(rows)} BBC rows,"
        f" {args.epochs} epochs, {tune['training_s']:.0f} s of training)\n\n"
        + table
        + f"\n\nwhile training / idle: proxy p50 {ratios['proxy_p50_ratio']:.2f}x,"
        f" p99 {ratios['proxy_p99_ratio']:.2f}x (target: within 2x); direct to Postgres p50"
        f" {ratios['direct_p50_ratio']:.2f}x, p99 {ratios['direct_p99_ratio']:.2f}x (the machine's share)\n"
        + (f"\nMachine: {args.note}\n" if args.note else "")
    )
    data = {"figures": figures, "args": vars(args), "machine": machine_info()}
    write_results("tune-latency", data, md)


if __name__ == "__main__":
    main()
