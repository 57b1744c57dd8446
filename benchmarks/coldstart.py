"""Cold start: first-call times and the proxy's resident memory (issue 13).

Run: ``.venv/bin/python -m benchmarks.coldstart [--models-cache PATH]``.
It starts its own Postgres and the real proxy CLI twice on one fresh runtime cache: first with
nothing exported (the ONNX exports of MiniLM and SmolLM2 run in the background while the first
calls run on torch; MiniLM then switches to ONNX Runtime, the chat stays on torch in that process),
then again once those exports are on disk. Each run records the RSS of the idle proxy, the first
`pgml.embed` (all-MiniLM-L6-v2), the first `pgml.embed` of five new connections once the model is
loaded (target: under 50 ms), the first chat `pgml.transform` (SmolLM2, 8 new tokens), and the RSS
after each model; `SHOW MODELS` says which engine served each first call. A third run, with a
memory budget that holds one model, loads and evicts the two in turn and records the RSS after
each load (an evicted model's memory must come back). Results go to
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
CHAT_SQL = ("SELECT pgml.transform(task => %s::jsonb, inputs => %s::jsonb[],"
            " args => '{\"max_new_tokens\": 8}')")


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


def _models(p: ProxyProcess) -> list[dict[str, str]]:
    with psycopg.connect(p.dsn(database="pgml_proxy"), autocommit=True) as c:
        cur = c.execute("SHOW MODELS")
        names = [d.name for d in cur.description or []]
        return [{k: str(v) for k, v in zip(names, r, strict=True)} for r in cur.fetchall()]


def _engines(p: ProxyProcess) -> dict[str, str]:
    """Model name -> its engines (a model serving on torch while its export runs is listed twice
    once the ONNX one is loaded), with the precision note where there is one."""
    out: dict[str, list[str]] = {}
    for m in _models(p):
        note = m["precision"].partition("; ")[2]
        out.setdefault(m["name"], []).append(m["engine"] + (f" ({note})" if note else ""))
    return {name: ", ".join(engines) for name, engines in out.items()}


def _wait(p: ProxyProcess, timeout: float, done: Any, call: tuple[str, tuple[Any, ...]] | None) -> float:
    """Seconds until `done(models)` holds (a background export finished), or -1."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if call is not None:
            _timed(p.dsn(), *call)  # calls go on meanwhile, answered on torch
        if done(_models(p)):
            return time.monotonic() - start
        time.sleep(2)
    return -1.0


def _minilm_on_onnx(models: list[dict[str, str]]) -> bool:
    return any(m["engine"] == "onnx" and MINILM in m["name"] for m in models)


def _chat_export_done(models: list[dict[str, str]]) -> bool:
    # The chat stays on torch in this process; SHOW MODELS says when its export is on disk.
    return any("SmolLM2" in m["name"] and ("on disk" in m["precision"] or m["engine"] == "onnx"
                                           or "no ONNX export" in m["precision"]) for m in models)


def _one_run(dsn: str, config: Path, label: str, wait_export: float) -> dict[str, Any]:
    p = start_proxy(dsn, "session", config=config)
    try:
        with psycopg.connect(p.dsn(), autocommit=True) as c:
            c.execute("SELECT 1")
        time.sleep(1)
        out: dict[str, Any] = {"run": label, "rss_idle_mb": _rss_mb(p.pid)}
        out["first_embed_ms"] = _timed(p.dsn(), "SELECT pgml.embed(%s, 'hello')", (MINILM,))
        out["engine_after_first_embed"] = _engines(p).get(MINILM, "?")
        if wait_export:
            # The five new connections below measure the loaded model, on the engine it ends on.
            out["minilm_export_s"] = _wait(p, wait_export, _minilm_on_onnx,
                                           ("SELECT pgml.embed(%s, 'x')", (MINILM,)))
        news = [_timed(p.dsn(), "SELECT pgml.embed(%s, 'a new connection')", (MINILM,)) for _ in range(5)]
        out["new_connection_embed_ms"] = statistics.median(news)
        out["rss_minilm_mb"] = _rss_mb(p.pid)
        out["first_chat_ms"] = _timed(p.dsn(), CHAT_SQL, (CHAT, MESSAGES))
        out["engine_after_first_chat"] = next((e for n, e in _engines(p).items() if "SmolLM2" in n), "?")
        out["second_chat_ms"] = _timed(p.dsn(), CHAT_SQL, (CHAT, MESSAGES))
        out["rss_smollm2_mb"] = _rss_mb(p.pid)
        if wait_export:
            out["chat_export_s"] = _wait(p, wait_export, _chat_export_done, None)
        out["engines"] = _engines(p)
        return out
    finally:
        p.stop()


def _eviction_run(dsn: str, config: Path, cycles: int) -> dict[str, Any]:
    """With `runtime.memory_budget_mb = 1` each model evicts the other as it loads: embed (MiniLM
    in, SmolLM2 out), chat (SmolLM2 in, MiniLM out), `cycles` times. The RSS after each load says
    whether an evicted model's memory goes back (it would grow by a model a cycle if not)."""
    budget = config.with_name("config-evict.toml")
    budget.write_text(config.read_text().replace("[runtime]\n", "[runtime]\nmemory_budget_mb = 1\n", 1))
    p = start_proxy(dsn, "session", config=budget)
    try:
        with psycopg.connect(p.dsn(), autocommit=True) as c:
            c.execute("SELECT 1")
        out: dict[str, Any] = {"rss_idle_mb": _rss_mb(p.pid), "cycles": []}
        for _ in range(cycles):
            _timed(p.dsn(), "SELECT pgml.embed(%s, 'hello')", (MINILM,))
            minilm = _rss_mb(p.pid)
            loaded_minilm = sorted(m["name"] for m in _models(p))
            _timed(p.dsn(), CHAT_SQL, (CHAT, MESSAGES))
            smollm = _rss_mb(p.pid)
            loaded_smollm = sorted(m["name"] for m in _models(p))
            out["cycles"].append({"rss_minilm_only_mb": minilm, "loaded_after_embed": loaded_minilm,
                                  "rss_smollm2_only_mb": smollm, "loaded_after_chat": loaded_smollm})
        return out
    finally:
        p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-export", type=float, default=300, help="seconds to wait for the export")
    parser.add_argument("--eviction-cycles", type=int, default=4, help="load/evict cycles of the two models")
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
        eviction = _eviction_run(server.dsn, config, args.eviction_cycles)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    info = machine_info()
    info["load_start"], info["load_end"] = load_start, os.getloadavg()[0]
    headers = ["run", "RSS idle MB", "first embed ms", "engine then",
               "new-connection embed ms (median of 5)", "RSS + MiniLM MB", "first chat ms", "engine then",
               "second chat ms", "RSS + SmolLM2 MB"]
    rows = [[r["run"], r["rss_idle_mb"], r["first_embed_ms"], r["engine_after_first_embed"],
             r["new_connection_embed_ms"], r["rss_minilm_mb"], r["first_chat_ms"],
             r["engine_after_first_chat"], r["second_chat_ms"], r["rss_smollm2_mb"]] for r in runs]
    md = (
        f"# coldstart ({info['date_utc']}, {info['cpu']}, {info['cpus']} CPUs)\n\n"
        + markdown_table(headers, rows)
        + "\n\nOn the fresh cache, MiniLM ran on ONNX Runtime"
        f" {runs[0].get('minilm_export_s', -1):.1f} s after its first call answered (the background"
        " export and load; -1: not within the wait), and"
        f" SmolLM2's export was on disk {runs[0].get('chat_export_s', -1):.1f} s after the second chat."
        " Engines at the end of each run: "
        + "; ".join(f"{r['run']}: {r['engines']}" for r in runs)
        + "\n\n## Memory after eviction\n\n`runtime.memory_budget_mb = 1`, exports on disk: each model"
        " evicts the other as it loads (embed with MiniLM, then a chat with SmolLM2, repeated). RSS of"
        f" the idle proxy {eviction['rss_idle_mb']:.0f} MB.\n\n"
        + markdown_table(["cycle", "RSS, MiniLM alone MB", "loaded", "RSS, SmolLM2 alone MB", "loaded"],
                         [[i + 1, c["rss_minilm_only_mb"], ", ".join(c["loaded_after_embed"]),
                           c["rss_smollm2_only_mb"], ", ".join(c["loaded_after_chat"])]
                          for i, c in enumerate(eviction["cycles"])])
        + f"\n\nLoad average {load_start:.2f} at the start, {info['load_end']:.2f} at the end (2 CPUs shared"
        " with other work: noisy). Command: `.venv/bin/python -m benchmarks.coldstart`.\n"
    )
    write_results("coldstart", {"machine": info, "runs": runs, "eviction": eviction}, md)


if __name__ == "__main__":
    main()
