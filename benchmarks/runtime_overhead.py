"""The runtime's own cost per row, where the model costs little: a tiny BERT sentence-transformer.

On a GPU a row of MiniLM costs about 11 µs of model time (87,000 sentences/s), so what the
runtime adds per row (lookup, queueing, futures, list conversion) decides whether the GPU is
kept busy. A tiny model on the CPU makes that cost visible here: the engine's own `encode` in
batches (the ceiling) against `Runtime.call_batch` with 1,024-row statements and with many
one-row callers, in the same process; the per-row overhead is the difference in time per row.

    .venv/bin/python -m benchmarks.runtime_overhead
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, markdown_table, write_results
from benchmarks.embed import through_runtime


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-dir", default=".cache/pgml-proxy-bench")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from testing.tiny_models import build_all

    folder = build_all(".cache/tiny-models") / "bert-embed"
    sents = [f"short sentence number {i} about databases" for i in range(args.sentences)]
    runs = [asyncio.run(through_runtime(args, sents, "cpu", folder)) for _ in range(args.rounds)]
    best = {k: max(r[k] for r in runs) for k in runs[0]}  # best of rounds: least disturbed
    ceiling = best["sentence_transformers_encode_in_runtime"]
    rows = [[k, v, v / ceiling, (1 / v - 1 / ceiling) * 1e6] for k, v in best.items()]
    md = (
        f"# Runtime overhead per row, CPU, tiny BERT sentence-transformer, {args.sentences} sentences, "
        f"best of {args.rounds}\n\n"
        + markdown_table(["path", "rows/s", "x engine ceiling", "µs added per row"], rows)
    )
    info = {"machine": machine_info(), "args": vars(args), "rounds": runs, "best": best}
    write_results("runtime-overhead", {**info, "load_average": os.getloadavg()}, md)


if __name__ == "__main__":
    main()
