"""`POST /v1/embeddings` requests/s against `SELECT pgml.embed(...)` through SQL, same proxy, same model.

One proxy (its HTTP listener on) in front of a fresh Postgres; MiniLM. At each concurrency
(1, 8, 32 clients), every client sends one sentence per request for `--seconds`, first over
HTTP (httpx, keep-alive, the OpenAI request shape) and then over SQL (one psycopg connection
per client, a bound parameter). Both reach the same batcher, so the ratio is what the HTTP
layer costs (or saves) against the wire protocol. The load average before and after is
recorded: on a shared machine the figures are noisy.
Writes benchmarks/results/http.{json,md}.

Usage: .venv/bin/python -m benchmarks.http [--seconds 5] [--rounds 2] [--clients 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from benchmarks.common import machine_info, markdown_table, median, write_results
from benchmarks.embed import corpus_sentences

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


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
        for clients in levels:
            runs = per_level.setdefault(clients, {"http": [], "sql": []})
            for _ in range(args.rounds):
                runs["http"].append(asyncio.run(_http(url, texts, clients, args.seconds)))
                runs["sql"].append(asyncio.run(_sql(proxy.dsn(), texts, clients, args.seconds)))
    finally:
        if proxy is not None:
            proxy.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    rows = []
    figures: dict[str, Any] = {}
    for clients, runs in per_level.items():
        http, sql = median(runs["http"]), median(runs["sql"])
        figures[str(clients)] = {"http_req_per_s": http, "sql_req_per_s": sql, "http_vs_sql": http / sql,
                                 "rounds": runs}
        rows.append([clients, http, sql, http / sql])
    md = (f"# http: /v1/embeddings vs SELECT pgml.embed, {MODEL}, one sentence per request\n\n"
          + markdown_table(["clients", "HTTP req/s", "SQL req/s", "HTTP / SQL"], rows)
          + f"\n\n{args.rounds} rounds of {args.seconds:.0f} s per level (medians); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (a shared machine: noisy)\n")
    write_results("http", {"model": MODEL, "seconds": args.seconds, "rounds": args.rounds,
                           "load_before": load_before, "load_after": load_after, "figures": figures,
                           "machine": machine_info()}, md)


if __name__ == "__main__":
    main()
