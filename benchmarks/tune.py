"""Fine-tuning through `pgml.tune` against the same Trainer in a plain script, and tuned-model serving.

(a) the ceiling: Hugging Face's `Trainer` on MiniLM and BBC News rows in this process, the
same arguments; (b) `pgml.tune` through the proxy on the same rows in a table. Both
figures are the Trainer's own `train_samples_per_second` (for (b) read from the train
summary the proxy relays), so process start and model loading are outside both; the
whole statement's wall time is reported beside. (c) serving: rows/s of
`pgml.transform` with the tuned project as the model, in batches of `--batch`.

    python -m benchmarks.tune --rows 120 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import machine_info, markdown_table, write_results

ARGS = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 1e-4}
CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _ceiling(rows: list[tuple[str, str]], epochs: int, max_len: int, out: Path) -> float:
    """train_samples_per_second of a plain Trainer run on the rows the proxy trains on."""
    from runtime.resolve import builtin_aliases
    from runtime.tune import worker

    labels = sorted({c for _, c in rows})
    n_test = round(len(rows) * 0.25)
    train, test = rows[: len(rows) - n_test], rows[len(rows) - n_test :]

    def part(items: list[tuple[str, str]]) -> dict[str, list[Any]]:
        return {"text": [t for t, _ in items], "label": [labels.index(c) for _, c in items]}

    job = {
        "task": "text-classification",
        "base": builtin_aliases()["sentence-transformers/all-MiniLM-L6-v2"],
        "labels": labels,
        "train": part(train),
        "test": part(test),
        "training_args": {**ARGS, "num_train_epochs": epochs, "logging_steps": 1000},
        "max_seq_length": max_len,
    }
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))  # as the worker process does
    result = worker._classify(job, out)
    return float(result["train"]["train_samples_per_second"])


def load_bbc(conn: psycopg.Connection[Any], rows: list[tuple[str, str]]) -> None:
    """The rows as table `bench_bbc (text, class)`, which the tune benchmarks train on."""
    conn.execute("CREATE TABLE bench_bbc (text text, class text)")
    with conn.cursor().copy("COPY bench_bbc (text, class) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _through_proxy(dsn: str, rows: list[tuple[str, str]], epochs: int, max_len: int) -> dict[str, float]:
    notes: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        load_bbc(conn, rows)
        hyper = {
            "training_args": {**ARGS, "num_train_epochs": epochs, "logging_steps": 1000},
            "max_seq_length": max_len,
        }
        started = time.perf_counter()
        conn.execute(
            "SELECT * FROM pgml.tune('bench', 'text-classification', 'bench_bbc', NULL,"
            " 'sentence-transformers/all-MiniLM-L6-v2', %s::jsonb, test_sampling => 'last')",
            (json.dumps(hyper),),
        ).fetchall()
        wall = time.perf_counter() - started
    summary = next(json.loads(n) for n in notes if n.startswith("{") and "train_samples_per_second" in n)
    return {"proxy_samples_per_s": float(summary["train_samples_per_second"]), "proxy_statement_s": wall}


def _serving(dsn: str, texts: list[str], batch: int) -> float:
    task = json.dumps({"task": "text-classification", "model": "bench"})
    sql = "SELECT pgml.transform(task => %s::jsonb, inputs => %s)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql, (task, texts[:batch]))  # load (and export) once
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            conn.execute(sql, (task, texts[i : i + batch])).fetchall()
        return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--note", default="", help="what else ran on the machine, for the result file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from testing.bbc import bbc
    from testing.postgres import start_postgres
    from testing.proxy import start_proxy

    rows = bbc(args.rows // len(CLASSES), CLASSES, chars=1000)
    base = Path(tempfile.mkdtemp(prefix="pgml-bench-tune-"))
    base.chmod(0o755)
    pg = start_postgres(base / "pg")
    proxy = None
    try:
        ceiling = _ceiling(rows, args.epochs, args.max_len, base / "plain")
        proxy = start_proxy(pg.dsn, "session")
        figures: dict[str, Any] = {"ceiling_samples_per_s": ceiling}
        figures.update(_through_proxy(proxy.dsn(), rows, args.epochs, args.max_len))
        unseen = [t for t, _ in bbc(20, CLASSES, chars=1000, skip=300)]
        figures["serving_rows_per_s"] = _serving(proxy.dsn(), unseen, args.batch)
    finally:
        if proxy is not None:
            proxy.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    figures["proxy_vs_ceiling"] = figures["proxy_samples_per_s"] / ceiling
    table = markdown_table(
        ["path", "train samples/s", "share of ceiling"],
        [
            ["Trainer in a plain script (ceiling)", ceiling, 1.0],
            ["pgml.tune through the proxy", figures["proxy_samples_per_s"], figures["proxy_vs_ceiling"]],
        ],
    )
    md = (
        f"# tune: MiniLM on {len(rows)} BBC News rows, {args.epochs} epoch(s),"
        f" max_seq_length {args.max_len}\n\n"
        + table
        + f"\n\npgml.tune statement: {figures['proxy_statement_s']:.1f} s wall; serving the tuned project"
        f" through pgml.transform: {figures['serving_rows_per_s']:.1f} rows/s (batches of {args.batch})\n"
        + (f"\nMachine: {args.note}\n" if args.note else "")
    )
    write_results("tune-cpu", {"figures": figures, "args": vars(args), "machine": machine_info()}, md)


if __name__ == "__main__":
    main()
