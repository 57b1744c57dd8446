"""Generation throughput on the CPU: SmolLM2-135M-Instruct (real) on ONNX Runtime against torch.

Each engine serves the same chat prompts (BBC News sentences to summarise), greedy, exactly
`--new-tokens` new tokens each (min = max), through the runtime: (a) one call per prompt, one
caller; (b) one call per prompt from `--callers` concurrent callers, batched by the runtime;
(c) the engine alone, the runtime's own pipeline called with every prompt of the round at once
(the ceiling); (d) the engine one prompt at a time. Paths and engines are interleaved in rounds
so load from elsewhere hits them alike. Figures are new tokens per second; ratios are ONNX
over torch for the same path in the same run.

    .venv/bin/python -m benchmarks.generate
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, markdown_table, write_results
from benchmarks.embed import corpus_sentences, rate

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _chat(sentence: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Summarise in a few words: {sentence}"}]


async def _round(rt: Any, ctx: Any, prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    task = {"task": "conversational", "model": SMOL}

    async def one(sentence: str) -> None:
        await rt.call_batch("transform", [{"task": task, "args": gen, "inputs": [_chat(sentence)]}], ctx)

    async def caller(part: Sequence[str]) -> None:
        for s in part:
            await one(s)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for s in prompts:
        await one(s)
    seconds["runtime_one_caller"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(prompts[i :: args.callers]) for i in range(args.callers)))
    seconds[f"runtime_{args.callers}_callers"] = time.perf_counter() - t0
    pipe = next(iter(rt.models._models.values())).obj.pipe  # the runtime's own engine object
    chats = [_chat(s) for s in prompts]
    t0 = time.perf_counter()
    pipe(chats, batch_size=len(chats), return_full_text=False, **gen)
    seconds["engine_batched_ceiling"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in chats:
        pipe([c], return_full_text=False, **gen)
    seconds["engine_one_at_a_time"] = time.perf_counter() - t0
    return seconds


async def _figures(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from core.interfaces import CallContext
    from runtime import Runtime

    async def notice(_: str) -> None:
        return None

    ctx = CallContext(notice=notice)
    sents = corpus_sentences(args.prompts * args.rounds, seed=1)
    runtimes: dict[str, Any] = {}
    for eng in args.engines:
        # The benchmark names its models by folder (random or converted copies): paths allowed.
        cfg = {"device": "cpu", "engine": eng, "cache_dir": args.cache_dir, "batch_wait_ms": 2}
        rt = Runtime({**cfg, "allow_paths": True}, "")
        await rt.start()
        warm = {"task": {"task": "conversational", "model": SMOL}, "args": {"max_new_tokens": 2}}
        await rt.call_batch("transform", [{**warm, "inputs": [_chat("warm up")]}], ctx)
        runtimes[eng] = rt
    spent: dict[tuple[str, str], float] = {}
    try:
        for r in range(args.rounds):
            part = sents[r * args.prompts : (r + 1) * args.prompts]
            for eng, rt in runtimes.items():
                for path, s in (await _round(rt, ctx, part, args)).items():
                    spent[(eng, path)] = spent.get((eng, path), 0.0) + s
    finally:
        for rt in runtimes.values():
            await rt.close()
    tokens = args.prompts * args.rounds * args.new_tokens
    out: dict[str, dict[str, float]] = {}
    for (eng, path), total in spent.items():
        out.setdefault(eng, {})[path] = rate(tokens, total)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    p.add_argument("--prompts", type=int, default=16, help="prompts per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cache-dir", default=".cache/pgml-proxy-bench")
    args = p.parse_args(argv)
    figures = asyncio.run(_figures(args))
    paths = list(next(iter(figures.values())))
    both = {"torch", "onnx"} <= set(figures)
    rows = [
        [path, *(figures[e][path] for e in args.engines)]
        + ([figures["onnx"][path] / figures["torch"][path]] if both else [])
        for path in paths
    ]
    headers = ["path", *(f"{e} new tokens/s" for e in args.engines)] + (["onnx / torch"] if both else [])
    md = (
        f"# Generation throughput, CPU, {SMOL}, greedy, {args.new_tokens} new tokens per prompt, "
        f"{args.prompts * args.rounds} prompts\n\n" + markdown_table(headers, rows)
    )
    info = {"machine": machine_info(), "args": vars(args), "figures": figures}
    write_results("generate-cpu", info, md)


if __name__ == "__main__":
    main()
