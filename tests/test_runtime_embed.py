"""pgml.embed and pgml.rank through the runtime with the real all-MiniLM-L6-v2 (ONNX Runtime and torch)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from core.errors import InvalidParameterValue, UndefinedModel
from core.interfaces import CallContext
from runtime import Runtime
from runtime.config import RuntimeConfig
from runtime.resolve import Resolver
from testing.tiny_models import build_all

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = [
    "The cat sits on the mat.",
    "PostgreSQL is an open source relational database.",
    "How do I bake sourdough bread at home?",
    "a",
    "Embeddings place similar sentences close together in vector space, which makes search work.",
]
CACHE = ".cache/pgml-proxy-test"


async def _notice(_: str) -> None:
    return None


CTX = CallContext(notice=_notice)


@pytest.fixture(scope="module")
def reference() -> Any:
    from sentence_transformers import SentenceTransformer

    path = Resolver(RuntimeConfig()).resolve(MINILM).path
    return SentenceTransformer(str(path), device="cpu")


@pytest.fixture(scope="module")
async def runtimes() -> AsyncIterator[dict[str, Runtime]]:
    tiny = build_all(".cache/tiny-models")
    aliases = {"tiny-ce": str(tiny / "bert-cross-encoder"), "tiny-embed": str(tiny / "bert-embed")}
    out = {}
    for engine in ("onnx", "torch"):
        rt = Runtime(
            {
                "device": "cpu",
                "engine": engine,
                "cache_dir": CACHE,
                "aliases": aliases,
                "threads": 2,
                "batch_wait_ms": 2,
            },
            "",
        )
        await rt.start()
        out[engine] = rt
    yield out
    for rt in out.values():
        await rt.close()


async def _embed(rt: Runtime, texts: list[str], kwargs: dict[str, Any] | None = None) -> np.ndarray:
    rows = await rt.call_batch(
        "embed", [{"transformer": MINILM, "inputs": texts, "kwargs": kwargs or {}}], CTX
    )
    return np.array([r[0] for r in rows[0]], dtype=np.float32)


@pytest.mark.parametrize("engine", ["onnx", "torch"])
async def test_minilm_matches_sentence_transformers(
    runtimes: dict[str, Runtime], reference: Any, engine: str
) -> None:
    got = await _embed(runtimes[engine], SENTENCES)
    want = reference.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 0.999
    # MiniLM's modules.json ends with Normalize: unit vectors without asking.
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    info = {m["name"]: m for m in runtimes[engine].models_info()}[MINILM]
    assert info["engine"] == engine and info["device"] == "cpu" and info["memory_bytes"] > 10_000_000


async def test_onnx_and_torch_agree(runtimes: dict[str, Runtime]) -> None:
    # Stated tolerance: max abs difference 1e-4 per component (fp32 on both engines).
    a = await _embed(runtimes["onnx"], SENTENCES)
    b = await _embed(runtimes["torch"], SENTENCES)
    assert np.abs(a - b).max() < 1e-4


async def test_scalar_form_prompt_and_truncate_dim(runtimes: dict[str, Runtime], reference: Any) -> None:
    rt = runtimes["onnx"]
    [vec] = await rt.call_batch("embed", [{"transformer": MINILM, "text": SENTENCES[1], "kwargs": {}}], CTX)
    assert isinstance(vec, list) and len(vec) == 384 and all(isinstance(x, float) for x in vec)
    got = await _embed(rt, SENTENCES[:2], {"prompt": "query: ", "truncate_dim": 64})
    want = reference.encode(SENTENCES[:2], prompt="query: ", truncate_dim=64)
    assert got.shape == (2, 64)
    np.testing.assert_allclose(got, want, atol=1e-4)
    normed = await _embed(rt, SENTENCES[:2], {"truncate_dim": 64, "normalize_embeddings": True})
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)


async def test_32_concurrent_callers_get_their_own_results(
    runtimes: dict[str, Runtime], reference: Any
) -> None:
    rt = runtimes["onnx"]
    texts = [
        f"Sentence number {i} talks about {'databases' if i % 2 else 'cooking'} " * (1 + i % 4)
        for i in range(32)
    ]
    want = reference.encode(texts)
    before = {m["name"]: m["batches"] for m in rt.models_info()}[MINILM]
    results = await asyncio.gather(
        *(rt.call_batch("embed", [{"transformer": MINILM, "text": t, "kwargs": {}}], CTX) for t in texts)
    )
    got = np.array([r[0] for r in results], dtype=np.float32)
    assert np.sum(got * want, axis=1).min() > 0.999
    after = {m["name"]: m["batches"] for m in rt.models_info()}[MINILM]
    assert after - before < 32  # the calls were batched together


async def test_one_call_batch_of_many_rows(runtimes: dict[str, Runtime], reference: Any) -> None:
    rt = runtimes["onnx"]
    calls = [{"transformer": MINILM, "text": s, "kwargs": {}} for s in SENTENCES]
    got = np.array(await rt.call_batch("embed", calls, CTX), dtype=np.float32)
    assert np.sum(got * reference.encode(SENTENCES), axis=1).min() > 0.999


async def test_mixed_calls_in_one_batch_keep_their_order(
    runtimes: dict[str, Runtime], reference: Any
) -> None:
    # One statement can mix models, kwargs and both forms: calls are grouped by model and
    # kwargs for one submit each, and every call still gets its own answer in its place.
    rt = runtimes["onnx"]
    a, b, c = SENTENCES[:3]
    calls = [
        {"transformer": MINILM, "text": a, "kwargs": {}},
        {"transformer": "tiny-embed", "text": a, "kwargs": {}},
        {"transformer": MINILM, "inputs": [b, c], "kwargs": {}},
        {"transformer": MINILM, "text": b, "kwargs": {"truncate_dim": 8}},
        {"transformer": MINILM, "inputs": [], "kwargs": {}},
        {"transformer": MINILM, "text": c, "kwargs": {}},
    ]
    out = await rt.call_batch("embed", calls, CTX)
    want = reference.encode([a, b, c])
    assert len(out) == 6
    np.testing.assert_allclose(out[0], want[0], atol=1e-4)
    assert len(out[1]) == 32  # the tiny model's dimension, not MiniLM's
    assert [len(row) for row in out[2]] == [1, 1]
    np.testing.assert_allclose([row[0] for row in out[2]], want[1:3], atol=1e-4)
    np.testing.assert_allclose(out[3], want[1][:8], atol=1e-4)  # truncated, not renormalised
    assert out[4] == []
    np.testing.assert_allclose(out[5], want[2], atol=1e-4)
    with pytest.raises(InvalidParameterValue, match="every input must be text"):
        bad = {"transformer": MINILM, "inputs": ["x", 1], "kwargs": {}}
        await rt.call_batch("embed", [calls[0], bad], CTX)


async def test_tiny_sentence_transformer_folder(runtimes: dict[str, Runtime]) -> None:
    [vec] = await runtimes["onnx"].call_batch(
        "embed", [{"transformer": "tiny-embed", "text": "hi", "kwargs": {}}], CTX
    )
    assert len(vec) == 32 and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5


async def test_embed_errors(runtimes: dict[str, Runtime]) -> None:
    rt = runtimes["onnx"]
    with pytest.raises(UndefinedModel) as info:
        await rt.call_batch("embed", [{"transformer": "nobody/nothing", "text": "x", "kwargs": {}}], CTX)
    assert info.value.sqlstate == "42704" and "nobody/nothing" in info.value.message
    with pytest.raises(InvalidParameterValue, match='unknown kwarg "normalise"'):
        await rt.call_batch(
            "embed", [{"transformer": MINILM, "text": "x", "kwargs": {"normalise": True}}], CTX
        )
    with pytest.raises(InvalidParameterValue, match="truncate_dim"):
        await rt.call_batch(
            "embed", [{"transformer": MINILM, "text": "x", "kwargs": {"truncate_dim": 0}}], CTX
        )
    with pytest.raises(InvalidParameterValue, match="larger than the model's dimension 384"):
        await rt.call_batch(
            "embed", [{"transformer": MINILM, "text": "x", "kwargs": {"truncate_dim": 999}}], CTX
        )
    # The runtime stays usable after errors.
    assert len((await _embed(rt, ["still works"]))[0]) == 384


async def test_rank_cross_encoder(runtimes: dict[str, Runtime]) -> None:
    from sentence_transformers import CrossEncoder

    rt = runtimes["onnx"]
    docs = ["Paris is in France.", "Bananas are yellow.", "The Eiffel tower is in Paris."]
    [rows] = await rt.call_batch(
        "rank", [{"transformer": "tiny-ce", "query": "Where is Paris?", "documents": docs, "kwargs": {}}], CTX
    )
    assert sorted(r[0] for r in rows) == [0, 1, 2]
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert all(docs[cid] == text and isinstance(score, float) for cid, score, text in rows)
    want = CrossEncoder(str(build_all(".cache/tiny-models") / "bert-cross-encoder"), device="cpu").predict(
        [("Where is Paris?", d) for d in docs]
    )
    np.testing.assert_allclose([dict((c, s) for c, s, _ in rows)[i] for i in range(3)], want, atol=1e-5)
    [top] = await rt.call_batch(
        "rank", [{"transformer": "tiny-ce", "query": "q", "documents": docs, "kwargs": {"top_k": 1}}], CTX
    )
    assert len(top) == 1


async def test_a_bad_call_does_not_fail_its_batch_mates(runtimes: dict[str, Runtime]) -> None:
    rt = runtimes["onnx"]
    good: object
    bad: object
    good, bad = await asyncio.gather(
        rt.call_batch("embed", [{"transformer": MINILM, "text": "fine", "kwargs": {}}], CTX),
        rt.call_batch("embed", [{"transformer": MINILM, "text": "x", "kwargs": {"truncate_dim": 999}}], CTX),
        return_exceptions=True,
    )
    assert isinstance(good, list) and len(good[0]) == 384
    assert isinstance(bad, InvalidParameterValue) and bad.sqlstate == "22023"
