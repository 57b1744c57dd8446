"""`POST /v1/embeddings` requests/s against a FastAPI + sentence-transformers service and against
`SELECT pgml.embed(...)` through SQL, same model, same machine.

One proxy (its HTTP listener on) in front of a fresh Postgres; MiniLM. The baseline is the
service people write without the proxy: FastAPI under uvicorn in its own process
(`baseline_app`), the same OpenAI request shape, `SentenceTransformer.encode` of each request's
input in FastAPI's thread pool (no batching across requests). At each concurrency (1, 8, 32
clients), every client sends one sentence per request for `--seconds`: over HTTP to the proxy
(httpx, keep-alive), over HTTP to the baseline, and over SQL (one psycopg connection per
client, a bound parameter). The proxy's HTTP and SQL callers reach the same batcher, so
HTTP / SQL is what the HTTP layer costs; proxy / baseline is what the batcher gains over
one-request-one-encode. The load average before and after is recorded: on a shared machine
the figures are noisy.
Writes benchmarks/results/http.{json,md}.

Usage: .venv/bin/python -m benchmarks.http [--seconds 5] [--rounds 2] [--clients 1,8,32]
       [--baseline-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pydantic import BaseModel

from benchmarks.common import machine_info, markdown_table, median, stop_process, write_results
from benchmarks.embed import corpus_sentences

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class EmbeddingRequest(BaseModel):
    """The baseline's request body: the fields the benchmark sends (module level: FastAPI reads
    the annotation by name)."""

    model: str
    input: str | list[str]


def baseline_app() -> Any:
    """The FastAPI + sentence-transformers service (a uvicorn factory: `--factory`)."""
    from fastapi import FastAPI
    from sentence_transformers import SentenceTransformer

    from runtime.resolve import builtin_aliases

    # The same files the proxy serves under this name (an installed package, offline).
    threads = os.environ.get("PGML_BENCH_TORCH_THREADS")
    if threads:  # on a small loaded machine torch's default (one per core) contends with itself
        import torch

        torch.set_num_threads(int(threads))
    model = SentenceTransformer(builtin_aliases().get(MODEL, MODEL), device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest) -> dict[str, Any]:  # a def: FastAPI runs it in its thread pool
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors = model.encode(texts)
        return {"object": "list", "model": req.model,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                         for i, v in enumerate(vectors)]}

    return app


def _start_baseline(port: int, threads: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PGML_BENCH_TORCH_THREADS": str(threads) if threads else ""}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "benchmarks.http:baseline_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the FastAPI baseline exited at start")
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError("the FastAPI baseline did not start in 120 s")


async def _http(base: str, texts: list[str], clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < deadline:
                r = await client.post("/v1/embeddings", json={"model": MODEL, "input": texts[i % len(texts)]})
                r.raise_for_status()
                done += 1
                i += clients

        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return done / (time.perf_counter() - start)


async def _sql(dsn: str, texts: list[str], clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(clients)]
    try:

        async def one(k: int, conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < deadline:
                cur = await conn.execute("SELECT pgml.embed(%s, %s)", (MODEL, texts[i % len(texts)]))
                await cur.fetchone()
                done += 1
                i += clients

        start = time.perf_counter()
        await asyncio.gather(*(one(k, c) for k, c in enumerate(conns)))
        return done / (time.perf_counter() - start)
    finally:
        for conn in conns:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--baseline-threads", type=int, default=0,
                        help="torch threads of the FastAPI baseline (0: torch's default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from testing.postgres import free_port, start_postgres
    from testing.proxy import TEST_CONFIG, start_proxy

    levels = [int(c) for c in args.clients.split(",")]
    texts = corpus_sentences(2000)
    base = Path(tempfile.mkdtemp(prefix="pgml-bench-http-"))
    base.chmod(0o755)
    pg = start_postgres(base)
    proxy = None
    baseline = None
    load_before = os.getloadavg()
    per_level: dict[int, dict[str, list[float]]] = {}
    try:
        port = free_port()
        config = base / "config.toml"
        config.write_text(TEST_CONFIG.read_text() + f'\n[http]\nlisten = "127.0.0.1:{port}"\n')
        proxy = start_proxy(pg.dsn, "session", config=config)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_http(url, texts, 1, 1.0))  # load the model and warm both paths
        asyncio.run(_sql(proxy.dsn(), texts, 1, 1.0))
        baseline_port = free_port()
        baseline = _start_baseline(baseline_port, args.baseline_threads)
        baseline_url = f"http://127.0.0.1:{baseline_port}"
        asyncio.run(_http(baseline_url, texts, 1, 3.0))  # its first encodes are slow
        for clients in levels:
            runs = per_level.setdefault(clients, {"http": [], "sql": [], "fastapi": []})
            for _ in range(args.rounds):
                runs["http"].append(asyncio.run(_http(url, texts, clients, args.seconds)))
                runs["sql"].append(asyncio.run(_sql(proxy.dsn(), texts, clients, args.seconds)))
                runs["fastapi"].append(asyncio.run(_http(baseline_url, texts, clients, args.seconds)))
    finally:
        if baseline is not None:
            stop_process(baseline)
        if proxy is not None:
            proxy.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    rows = []
    figures: dict[str, Any] = {}
    for clients, runs in per_level.items():
        http, sql, fastapi = median(runs["http"]), median(runs["sql"]), median(runs["fastapi"])
        figures[str(clients)] = {"http_req_per_s": http, "sql_req_per_s": sql, "fastapi_req_per_s": fastapi,
                                 "http_vs_sql": http / sql, "http_vs_fastapi": http / fastapi, "rounds": runs}
        rows.append([clients, http, sql, fastapi, http / sql, http / fastapi])
    md = (f"# http: /v1/embeddings vs FastAPI + sentence-transformers vs SELECT pgml.embed, {MODEL}, "
          "one sentence per request\n\n"
          + markdown_table(["clients", "proxy HTTP req/s", "proxy SQL req/s", "FastAPI req/s",
                            "HTTP / SQL", "HTTP / FastAPI"], rows)
          + f"\n\n{args.rounds} rounds of {args.seconds:.0f} s per level (medians); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (a shared machine: noisy); the "
          f"baseline's torch threads: {args.baseline_threads or 'torch default'}\n")
    write_results("http", {"model": MODEL, "seconds": args.seconds, "rounds": args.rounds,
                           "baseline_torch_threads": args.baseline_threads or None,
                           "load_before": load_before, "load_after": load_after, "figures": figures,
                           "machine": machine_info()}, md)


if __name__ == "__main__":
    main()
