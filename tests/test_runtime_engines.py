"""The same input gives the same answer on ONNX Runtime and on torch, for every transform task and rank.

Stated tolerance: every score, logit and feature within 1e-4 (absolute, fp32 on both engines);
labels, tokens, spans and generated text (greedy) identical. Tiny random models of the real
architectures (BERT, RoBERTa, BART, T5, GPT-2) make this a test of the engines' mechanics, not of
quality; the real SmolLM2 and MiniLM are compared in test_runtime_generate / test_runtime_embed.
"""

from __future__ import annotations

import importlib
import json
import os
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.interfaces import CallContext
from runtime import Runtime
from testing.tiny_models import build_all

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
GREEDY = {"max_new_tokens": 6, "do_sample": False}
QA = json.dumps({"question": "Where do I live?", "context": "My name is Merve and I live in Istanbul."})

# (task as SQL passes it, inputs, args): one case per README task family.
CASES: list[tuple[Any, list[Any], dict[str, Any]]] = [
    ("text-classification", ["I love it!", "I hate it."], {}),
    ({"task": "text-classification", "model": "roberta-large-mnli"}, ["A soccer game."], {}),
    (
        {"task": "zero-shot-classification", "model": "facebook/bart-large-mnli"},
        ["I have a problem with my iphone that needs to be resolved asap!!"],
        {"candidate_labels": ["urgent", "phone", "computer"]},
    ),
    ("token-classification", ["I am Omar and I live in New York City."], {}),
    (
        {"task": "token-classification", "model": "vblagoje/bert-english-uncased-finetuned-pos"},
        ["I live in Amsterdam."],
        {"aggregation_strategy": "simple"},
    ),
    ("question-answering", [QA, QA], {}),
    ("fill-mask", ["Paris is the <mask> of France."], {}),
    (
        {"task": "feature-extraction", "model": "distilbert/distilbert-base-cased"},
        ["hello world", "a longer sentence than the first"],
        {},
    ),
    ("translation_en_to_fr", ["How are you?", "Welcome to the future!"], GREEDY),
    ({"task": "summarization", "model": "sshleifer/distilbart-cnn-12-6"}, ["Paris is in France."], GREEDY),
    ("text2text-generation", ["translate English to French: I'm very happy"], GREEDY),
    ("text-generation", ["Three Rings for the Elven-kings", "Seven"], GREEDY),
]


async def _notice(_: str) -> None:
    return None


CTX = CallContext(notice=_notice)


@pytest.fixture(scope="module")
async def engines() -> AsyncIterator[dict[str, Runtime]]:
    build_all(ROOT / ".cache/tiny-models")
    section = tomllib.loads((ROOT / "tests/models.test.toml").read_text())["runtime"]
    defaults = {"fill-mask": "distilroberta-base", "translation": "t5-base", "text-generation": "gpt2"}
    out: dict[str, Runtime] = {}
    for engine in ("onnx", "torch"):
        rt = Runtime(
            {**section, "device": "cpu", "engine": engine, "threads": 2, "default_models": defaults}, ""
        )
        await rt.start()
        out[engine] = rt
    yield out
    for rt in out.values():
        await rt.close()


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and text; numbers within TOLERANCE."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), where
        assert abs(a - b) <= TOLERANCE, f"{where}: {a} vs {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} vs {set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize(("task", "inputs", "args"), CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
async def test_transform_same_on_both_engines(
    engines: dict[str, Runtime], task: Any, inputs: list[Any], args: dict[str, Any]
) -> None:
    call = {"task": task, "args": args, "inputs": inputs, "cache": False}
    [onnx] = await engines["onnx"].call_batch("transform", [call], CTX)
    [torch] = await engines["torch"].call_batch("transform", [call], CTX)
    assert onnx  # a real answer, not an empty one
    assert_same(onnx, torch)


async def test_rank_same_on_both_engines(engines: dict[str, Runtime]) -> None:
    docs = ["Paris is in France.", "Bananas are yellow.", "The Eiffel tower is in Paris."]
    call = {
        "transformer": "cross-encoder/ms-marco-MiniLM-L-6-v2",
        "query": "Where is Paris?",
        "documents": docs,
    }
    [onnx] = await engines["onnx"].call_batch("rank", [{**call, "kwargs": {}}], CTX)
    [torch] = await engines["torch"].call_batch("rank", [{**call, "kwargs": {}}], CTX)
    assert len(onnx) == 3
    assert_same([list(r) for r in onnx], [list(r) for r in torch])


async def test_each_engine_reports_what_it_runs(engines: dict[str, Runtime]) -> None:
    for engine, rt in engines.items():
        info = rt.models_info()
        assert len(info) >= len({json.dumps(c[0]) for c in CASES}) - 2  # some cases share a model
        assert {m["engine"] for m in info} == {engine}, info
        assert all(m["device"] == "cpu" and m["memory_bytes"] > 10_000 for m in info)


async def test_an_architecture_without_onnx_export(tmp_path: Path) -> None:
    # optimum-onnx has no exporter for CTRL: engine "auto" runs it on torch and says why;
    # engine "onnx" refuses it with 0A000 naming the model.
    from core.errors import FeatureNotSupported
    from testing.tiny_models import bpe_tokenizer

    transformers: Any = importlib.import_module("transformers")
    tok = bpe_tokenizer()
    cfg = transformers.CTRLConfig(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, dff=64)
    transformers.CTRLLMHeadModel(cfg).save_pretrained(str(tmp_path / "ctrl"))
    tok.save_pretrained(str(tmp_path / "ctrl"))
    call = {"task": {"task": "text-generation", "model": "ctrl"}, "args": GREEDY, "inputs": ["Hello"]}
    for engine in ("auto", "onnx"):
        # The first call exports and waits (no background export): this is the fallback's test.
        config = {"device": "cpu", "engine": engine, "cache_dir": str(tmp_path / "cache"),
                  "export_in_background": False}
        rt = Runtime({**config, "aliases": {"ctrl": str(tmp_path / "ctrl")}}, "")
        await rt.start()
        try:
            if engine == "auto":
                [[[out]]] = await rt.call_batch("transform", [call], CTX)
                assert out["generated_text"].startswith("Hello")
                [info] = rt.models_info()
                assert info["engine"] == "torch" and info["precision"].startswith("fp32 (no ONNX export")
            else:
                with pytest.raises(FeatureNotSupported, match='model "ctrl" has no ONNX export') as err:
                    await rt.call_batch("transform", [call], CTX)
                assert err.value.sqlstate == "0A000"
        finally:
            await rt.close()


async def test_models_over_the_export_limit_stay_on_torch(tmp_path: Path) -> None:
    section = tomllib.loads((ROOT / "tests/models.test.toml").read_text())["runtime"]
    config = {**section, "device": "cpu", "cache_dir": str(tmp_path), "onnx_max_model_mb": 1,
              "export_in_background": False}
    rt = Runtime(config, "")
    await rt.start()
    try:
        call = {"task": "text-classification", "args": {}, "inputs": ["I love it"]}
        [[out]] = await rt.call_batch("transform", [{**call, "cache": False}], CTX)
        assert set(out) == {"label", "score"}
        [info] = rt.models_info()
        assert info["engine"] == "torch" and "> runtime.onnx_max_model_mb" in info["precision"]
        assert not (tmp_path / "onnx").exists()  # nothing was exported
    finally:
        await rt.close()
