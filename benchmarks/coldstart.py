"""Cold start: first-call times and the proxy's resident memory (issue 13).

Run: ``.venv/bin/python -m benchmarks.coldstart [--models-cache PATH]``.
It starts its own Postgres and the real proxy CLI twice on one fresh runtime cache: first with
nothing exported (the ONNX export of MiniLM runs in the background while the first calls run on
torch), then again once that export is on disk. Each run records the RSS of the idle proxy, the
first `pgml.embed` (all-MiniLM-L6-v2), the first `pgml.embed` of five new connections once the
model is loaded (target: under 50 ms), the first chat `pgml.transform` (SmolLM2, 8 new tokens),
and the RSS after each model; `SHOW MODELS` says which engine served. Results go to
benchmarks/results/coldstart.{json,md}, with the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import machine_info, markdown_table, write_results
from testing.postgres import start_postgres
from testing.proxy import TEST_CONFIG, ProxyProcess, start_proxy

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CHAT = json.dumps({"task": "conversational", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
MESSAGES = [json.dumps({"role": "user", "content": "Name a colour."})]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT 1")  # the login is not the call's time
        start = time.perf_counter()
        c.execute(sql, params or None).fetchall()
        return (time.perf_counter() - start) * 1000


def _engines(p: ProxyProcess) -> dict[str, str]:
    with psycopg.connect(p.dsn(database="pgml_proxy"), autocommit=True) as c:
        cur = c.execute("SHOW MODELS")
        names = [d.name for d in cur.description or []]
        return {str(r[names.index("name")]): str(r[names.index("engine")]) for r in cur.fetchall()}


def _wait_for_onnx(p: ProxyProcess, timeout: float) -> float:
    """Seconds until SHOW MODELS says MiniLM runs on ONNX Runtime (the background export), or -1."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        _timed(p.dsn(), "SELECT pgml.embed(%s, 'x')", (MINILM,))  # the switch happens at a call
        if any("onnx" in e.lower() for n, e in _engines(p).items() if "MiniLM" in n):
            return time.monotonic() - start
        time.sleep(2)
    return -1.0


def _one_run(dsn: str, config: Path, label: str, wait_export: float) -> dict[str, Any]:
    p = start_proxy(dsn, "session", config=config)
    try:
        with psycopg.connect(p.dsn(), autocommit=True) as c:
            c.execute("SELECT 1")
        time.sleep(1)
        out: dict[str, Any] = {"run": label, "rss_idle_mb": _rss_mb(p.pid)}
        out["first_embed_ms"] = _timed(p.dsn(), "SELECT pgml.embed(%s, 'hello')", (MINILM,))
        out["engine_after_first_embed"] = _engines(p).get(MINILM, "?")
        news = [_timed(p.dsn(), "SELECT pgml.embed(%s, 'a new connection')", (MINILM,)) for _ in range(5)]
        out["new_connection_embed_ms"] = statistics.median(news)
        out["rss_minilm_mb"] = _rss_mb(p.pid)
        chat = ("SELECT pgml.transform(task => %s::jsonb, inputs => %s::jsonb[],"
                " args => '{\"max_new_tokens\": 8}')")
        out["first_chat_ms"] = _timed(p.dsn(), chat, (CHAT, MESSAGES))
        out["second_chat_ms"] = _timed(p.dsn(), chat, (CHAT, MESSAGES))
        out["rss_smollm2_mb"] = _rss_mb(p.pid)
        if wait_export:
            out["onnx_export_s"] = _wait_for_onnx(p, wait_export)
        out["engines"] = _engines(p)
        return out
    finally:
        p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-export", type=float, default=300, help="seconds to wait for the export")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="pgml-bench-coldstart-"))
    tmp.chmod(0o755)
    load_start = os.getloadavg()[0]
    config = tmp / "config.toml"
    cache = f'[runtime]\ncache_dir = "{tmp / "cache"}"\n'
    config.write_text(TEST_CONFIG.read_text().replace("[runtime]\n", cache, 1))
    server = start_postgres(tmp / "pg")
    try:
        runs = [_one_run(server.dsn, config, "fresh cache (nothing exported)", args.wait_export),
                _one_run(server.dsn, config, "exports on disk", 0)]
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    info = machine_info()
    info["load_start"], info["load_end"] = load_start, os.getloadavg()[0]
    headers = ["run", "RSS idle MB", "first embed ms", "engine then",
               "new-connection embed ms (median of 5)", "RSS + MiniLM MB", "first chat ms",
               "second chat ms", "RSS + SmolLM2 MB"]
    rows = [[r["run"], r["rss_idle_mb"], r["first_embed_ms"], r["engine_after_first_embed"],
             r["new_connection_embed_ms"], r["rss_minilm_mb"], r["first_chat_ms"], r["second_chat_ms"],
             r["rss_smollm2_mb"]] for r in runs]
    md = (
        f"# coldstart ({info['date_utc']}, {info['cpu']}, {info['cpus']} CPUs)\n\n"
        + markdown_table(headers, rows)
        + f"\n\nBackground ONNX export of MiniLM done {runs[0].get('onnx_export_s', -1):.1f} s after the"
        " first calls (-1: not within the wait). Engines at the end of each run: "
        + "; ".join(f"{r['run']}: {r['engines']}" for r in runs)
        + f"\n\nLoad average {load_start:.2f} at the start, {info['load_end']:.2f} at the end (2 CPUs shared"
        " with other work: noisy). Command: `.venv/bin/python -m benchmarks.coldstart`.\n"
    )
    write_results("coldstart", {"machine": info, "runs": runs}, md)


if __name__ == "__main__":
    main()
