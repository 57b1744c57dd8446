"""Model lifecycle: preload, LRU eviction within the memory budget, int8 quantisation's quality gate, CUDA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from planner.interfaces import CallContext
from runtime import Runtime
from runtime.engines import QUANT_MIN_COSINE, export_dir
from runtime.tiny_models import build_all

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
        await _classify(rt, "tiny-nli")
        assert [m["name"] for m in rt.models_info()] == ["tiny-nli"]  # least recently used went
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


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
async def test_cuda_fp16_matches_cpu() -> None:
    # Stated tolerance for fp16 on CUDA against fp32 on the CPU: cosine > 0.999.
    sents = ["The cat sits on the mat.", "PostgreSQL is a database."]
    out = {}
    for device in ("cpu", "cuda"):
        rt = Runtime({"device": device, "engine": "torch"}, "")
        await rt.start()
        try:
            rows = await rt.call_batch("embed", [{"transformer": MINILM, "inputs": sents, "kwargs": {}}], CTX)
            out[device] = np.array([r[0] for r in rows[0]])
            assert rt.models_info()[0]["device"] == device
        finally:
            await rt.close()
    assert np.sum(out["cpu"] * out["cuda"], axis=1).min() > 0.999
