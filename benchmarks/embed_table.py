"""`SELECT id, pgml.embed(model, body) FROM docs` through the proxy, against its ceiling and per-row calls.

Figures (rows/s, all on this machine in one run):
- ceiling: the runtime's own batch embedding of the same texts in this process
  (`Runtime.call_batch("embed", all rows)`), what no proxy can beat;
- proxy: the statement through the real `pgml-proxy` (psycopg, binary results), rows
  streamed from Postgres in chunks, one runtime batch per chunk; also the time to the
  first row;
- per row: one runtime call per row, one after the other, as the extension runs it
  (measured on a sample, `--per-row-sample` rows);
- the planner's own cost: the proxy's substring test for a statement without pgml, a
  cached pgml statement's analysis (parse-cache hit) and an uncached analysis.
Writes benchmarks/results/embed_table.{json,md}.

Usage: .venv/bin/python -m benchmarks.embed_table [--rows 10000] [--per-row-sample 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import machine_info, markdown_table, write_results
from benchmarks.embed import corpus_sentences

MODEL = "all-MiniLM-L6-v2"
SQL = "SELECT id, pgml.embed(model, body) FROM docs"
SLICE = 2000


async def _runtime_side(dsn: str, texts: list[str], sample: int) -> dict[str, float]:
    from core.interfaces import CallContext
    from runtime import Runtime

    async def notice(_: str) -> None:
        return None

    ctx = CallContext(notice=notice)
    rt = Runtime({}, dsn)
    try:
        await rt.call_batch("embed", [{"transformer": MODEL, "text": "warm up", "kwargs": {}}], ctx)
        calls = [{"transformer": MODEL, "text": t, "kwargs": {}} for t in texts]
        start = time.perf_counter()
        out: list[Any] = []
        # Slices below the runtime's queue bound (4096 items); the runtime batches inside each.
        for i in range(0, len(calls), SLICE):
            out += await rt.call_batch("embed", calls[i : i + SLICE], ctx)
        ceiling = time.perf_counter() - start
        assert len(out) == len(texts)
        start = time.perf_counter()
        for t in texts[:sample]:
            await rt.call_batch("embed", [{"transformer": MODEL, "text": t, "kwargs": {}}], ctx)
        per_row = time.perf_counter() - start
    finally:
        await rt.close()
    return {"ceiling_rows_per_s": len(texts) / ceiling, "per_row_rows_per_s": sample / per_row}


def _through_proxy(dsn: str, n: int) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgml.embed(%s, 'warm up')", (MODEL,))
        cur = conn.cursor(binary=True)
        start = time.perf_counter()
        first = None
        count = 0
        for _row in cur.stream(SQL):
            if first is None:
                first = time.perf_counter() - start
            count += 1
        total = time.perf_counter() - start
    assert count == n, count
    return {"proxy_rows_per_s": n / total, "proxy_first_row_s": first or 0.0, "proxy_total_s": total}


def _planner_costs() -> dict[str, float]:
    from planner.analyze import analyze
    from planner.handler import Handler
    from proxy import messages
    from proxy.frontend import _PGML  # the test the proxy runs on every Query and Parse message

    # The Query message as it arrives: the proxy searches its bytes from offset 5, never decodes.
    plain = messages.Query("SELECT abalance FROM pgbench_accounts WHERE aid = 1").encode()
    loops = 200_000
    substring = timeit.timeit(lambda: _PGML.search(plain, 5), number=loops) / loops
    handler = Handler(None, {})  # type: ignore[arg-type]  # analysis only: the runtime is not called
    handler.plans(SQL)
    cached = timeit.timeit(lambda: handler.plans(SQL), number=loops) / loops
    uncached = timeit.timeit(lambda: analyze(SQL), number=500) / 500
    return {
        "no_pgml_substring_test_us": substring * 1e6,
        "cached_analysis_us": cached * 1e6,
        "uncached_analysis_us": uncached * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--per-row-sample", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from testing.postgres import start_postgres
    from testing.proxy import start_proxy

    texts = corpus_sentences(args.rows)
    base = Path(tempfile.mkdtemp(prefix="pgml-bench-embed-table-"))
    base.chmod(0o755)
    pg = start_postgres(base)
    proxy = None
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE docs (id int PRIMARY KEY, model text, body text)")
            with conn.cursor().copy("COPY docs (id, model, body) FROM STDIN") as copy:
                for i, t in enumerate(texts, start=1):
                    copy.write_row((i, MODEL, t))
        figures: dict[str, Any] = asyncio.run(_runtime_side(pg.dsn, texts, args.per_row_sample))
        proxy = start_proxy(pg.dsn, "session")
        figures.update(_through_proxy(proxy.dsn(), args.rows))
        figures.update(_planner_costs())
    finally:
        if proxy is not None:
            proxy.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    figures["proxy_vs_ceiling"] = figures["proxy_rows_per_s"] / figures["ceiling_rows_per_s"]
    figures["proxy_vs_per_row"] = figures["proxy_rows_per_s"] / figures["per_row_rows_per_s"]
    rows = [
        ["runtime batch in one process (ceiling)", figures["ceiling_rows_per_s"], 1.0],
        ["through the proxy: " + SQL, figures["proxy_rows_per_s"], figures["proxy_vs_ceiling"]],
        [
            "one runtime call per row (extension style)",
            figures["per_row_rows_per_s"],
            figures["per_row_rows_per_s"] / figures["ceiling_rows_per_s"],
        ],
    ]
    md = (
        f"# embed_table: {args.rows} rows, {MODEL}\n\n"
        + markdown_table(["path", "rows/s", "share of ceiling"], rows)
        + f"\n\nproxy / one-call-per-row: {figures['proxy_vs_per_row']:.1f}x; first row after "
        f"{figures['proxy_first_row_s'] * 1000:.0f} ms of {figures['proxy_total_s']:.1f} s\n\n"
        + markdown_table(
            ["planner cost", "µs"],
            [
                ["statement without pgml (substring test)", figures["no_pgml_substring_test_us"]],
                ["pgml statement, cached analysis", figures["cached_analysis_us"]],
                ["pgml statement, uncached analysis (parse + rewrite)", figures["uncached_analysis_us"]],
            ],
        )
    )
    write_results(
        "embed_table", {"rows": args.rows, "model": MODEL, "figures": figures, "machine": machine_info()}, md
    )


if __name__ == "__main__":
    main()
