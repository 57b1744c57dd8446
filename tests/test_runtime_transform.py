"""pgml.transform for every README task, with tiny random models: output shapes and types only.

The models come from `testing.tiny_models` and are reached through the README's own hub names,
aliased in tests/models.test.toml, so these calls are the README examples themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidParameterValue, UndefinedModel
from core.interfaces import CallContext
from runtime import Runtime
from testing.tiny_models import NER_LABELS, NLI_LABELS, POS_LABELS, SENTIMENT_LABELS, build_all

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


async def _notice(_: str) -> None:
    return None


CTX = CallContext(notice=_notice)


@pytest.fixture(scope="module")
async def rt() -> AsyncIterator[Runtime]:
    build_all(ROOT / ".cache/tiny-models")
    section = tomllib.loads((ROOT / "tests/models.test.toml").read_text())["runtime"]
    defaults = {
        "text-classification": "distilbert-base-uncased-finetuned-sst-2-english",
        "token-classification": "dslim/bert-base-NER",
        "fill-mask": "bert-base-uncased",
        "translation": "t5-base",
        "text2text-generation": "t5-base",
        "text-generation": "gpt2",
    }
    # Every pipeline on its ONNX export from its first call (these tests compare the pipelines'
    # outputs, not the torch-while-exporting start, which tests/test_background_export.py covers).
    runtime = Runtime({**section, "device": "cpu", "threads": 2, "default_models": defaults,
                       "export_in_background": False}, "")
    await runtime.start()
    yield runtime
    await runtime.close()


async def transform(rt: Runtime, task: Any, inputs: list[Any], args: dict[str, Any] | None = None) -> Any:
    [out] = await rt.call_batch(
        "transform", [{"task": task, "args": args or {}, "inputs": inputs, "cache": False}], CTX
    )
    json.dumps(out)  # every result must be JSON-able as it is
    return out


async def test_text_classification(rt: Runtime) -> None:
    out = await transform(rt, "text-classification", ["I love it!", "I hate it."])
    assert len(out) == 2
    for item in out:
        assert set(item) == {"label", "score"} and item["label"] in SENTIMENT_LABELS
        assert isinstance(item["score"], float) and 0 <= item["score"] <= 1


@pytest.mark.parametrize(
    "model",
    [
        "roberta-large-mnli",
        "textattack/bert-base-uncased-QQP",
        "textattack/distilbert-base-uncased-CoLA",
        "ProsusAI/finbert",
    ],
)
async def test_text_classification_models_by_name(rt: Runtime, model: str) -> None:
    out = await transform(rt, {"task": "text-classification", "model": model}, ["A soccer game."])
    assert len(out) == 1 and set(out[0]) == {"label", "score"}
    if model == "roberta-large-mnli":
        assert out[0]["label"] in NLI_LABELS


async def test_zero_shot(rt: Runtime) -> None:
    labels = ["urgent", "not urgent", "phone", "tablet", "computer"]
    text = "I have a problem with my iphone that needs to be resolved asap!!"
    out = await transform(
        rt,
        {"task": "zero-shot-classification", "model": "facebook/bart-large-mnli"},
        [text],
        {"candidate_labels": labels},
    )
    assert len(out) == 1 and set(out[0]) == {"labels", "scores", "sequence"}
    assert out[0]["sequence"] == text and sorted(out[0]["labels"]) == sorted(labels)
    assert out[0]["scores"] == sorted(out[0]["scores"], reverse=True)
    assert abs(sum(out[0]["scores"]) - 1.0) < 1e-4


async def test_token_classification_ner_and_pos(rt: Runtime) -> None:
    text = "I am Omar and I live in New York City."
    [ents] = await transform(rt, "token-classification", [text])
    assert ents and all(set(e) == {"entity", "score", "index", "word", "start", "end"} for e in ents)
    assert all(
        e["entity"] in NER_LABELS and text[e["start"] : e["end"]].lower() == e["word"].replace("##", "")
        for e in ents
        if not e["word"].startswith("##")
    )
    [pos] = await transform(
        rt,
        {"task": "token-classification", "model": "vblagoje/bert-english-uncased-finetuned-pos"},
        ["I live in Amsterdam."],
        {"aggregation_strategy": "simple"},
    )
    assert pos and all(set(e) == {"entity_group", "score", "word", "start", "end"} for e in pos)
    assert all(e["entity_group"] in POS_LABELS for e in pos)


@pytest.mark.parametrize(
    ("task", "model"), [("translation", "Helsinki-NLP/opus-mt-en-fr"), ("translation_en_to_fr", None)]
)
async def test_translation(rt: Runtime, task: str, model: str | None) -> None:
    spec: Any = {"task": task, "model": model} if model else task
    out = await transform(rt, spec, ["How are you?", "Welcome to the future!"])
    assert len(out) == 2 and all(
        set(o) == {"translation_text"} and isinstance(o["translation_text"], str) for o in out
    )


async def test_summarization_lengths(rt: Runtime) -> None:
    text = "Paris is the capital and most populous city of France, with 2,175,601 residents in 2018."
    out = await transform(
        rt,
        {"task": "summarization", "model": "sshleifer/distilbart-cnn-12-6"},
        [text],
        {"min_length": 5, "max_length": 8},
    )
    assert len(out) == 1 and set(out[0]) == {"summary_text"} and isinstance(out[0]["summary_text"], str)


async def test_question_answering_single_and_many(rt: Runtime) -> None:
    qa = json.dumps({"question": "Where do I live?", "context": "My name is Merve and I live in Istanbul."})
    one = await transform(rt, "question-answering", [qa])
    # HF answers a single question with a bare object, as in the README.
    assert isinstance(one, dict) and set(one) == {"score", "start", "end", "answer"}
    ctx = "My name is Merve and I live in Istanbul."
    assert ctx[one["start"] : one["end"]] == one["answer"]
    many = await transform(rt, "question-answering", [qa, qa])
    assert isinstance(many, list) and len(many) == 2 and many[0] == many[1]
    with pytest.raises(InvalidParameterValue, match="question-answering input 1"):
        await transform(rt, "question-answering", ['{"question": "no context"}'])


async def test_text_generation_options(rt: Runtime) -> None:
    prompt = "Three Rings for the Elven-kings under the sky"
    out = await transform(
        rt, {"task": "text-generation", "model": "gpt2-medium"}, [prompt], {"max_new_tokens": 4}
    )
    assert len(out) == 1 and len(out[0]) == 1 and out[0][0]["generated_text"].startswith(prompt)
    three = await transform(
        rt,
        "text-generation",
        [prompt],
        {
            "num_return_sequences": 3,
            "do_sample": True,
            "temperature": 0.9,
            "top_p": 0.8,
            "top_k": 5,
            "max_new_tokens": 4,
        },
    )
    assert len(three[0]) == 3 and all(o["generated_text"].startswith(prompt) for o in three[0])
    beams = await transform(
        rt, "text-generation", [prompt, "Seven"], {"num_beams": 2, "early_stopping": True, "max_length": 20}
    )
    assert len(beams) == 2 and all(len(b) == 1 for b in beams)
    # Greedy (the pipeline samples by default, as Hugging Face's does) is deterministic.
    greedy = {"max_new_tokens": 4, "do_sample": False}
    alone = await transform(rt, "text-generation", ["Seven"], greedy)
    assert alone == await transform(rt, "text-generation", ["Seven"], greedy)


async def test_text2text_fill_mask_feature_extraction(rt: Runtime) -> None:
    out = await transform(rt, "text2text-generation", ["translate English to French: I'm very happy"])
    assert len(out) == 1 and set(out[0]) == {"generated_text"}
    masks = await transform(rt, "fill-mask", ["Paris is the [MASK] of France."])
    # One input: a flat list of the top 5, as in the README.
    assert len(masks) == 5 and all(set(m) == {"score", "token", "token_str", "sequence"} for m in masks)
    two = await transform(rt, "fill-mask", ["A [MASK].", "B [MASK]."], {"top_k": 2})
    assert len(two) == 2 and all(len(x) == 2 for x in two)
    [feats] = await transform(
        rt, {"task": "feature-extraction", "model": "distilbert/distilbert-base-cased"}, ["hello world"]
    )
    assert len(feats) == 1 and len(feats[0]) == 4 and len(feats[0][0]) == 32  # [CLS] hello world [SEP]


async def test_concurrent_calls_share_batches(rt: Runtime) -> None:
    texts = [f"text number {i}" for i in range(16)]
    alone = [await transform(rt, "text-classification", [t]) for t in texts[:4]]
    together = await asyncio.gather(*(transform(rt, "text-classification", [t]) for t in texts))
    for a, b in zip(alone, together[:4], strict=True):
        assert a[0]["label"] == b[0]["label"] and abs(a[0]["score"] - b[0]["score"]) < 1e-5


async def test_transform_errors(rt: Runtime) -> None:
    with pytest.raises(UndefinedModel, match="nobody/none"):
        await transform(rt, {"task": "text-classification", "model": "nobody/none"}, ["x"])
    with pytest.raises(InvalidParameterValue, match="unknown task option"):
        await transform(rt, {"task": "text-classification", "colour": "red"}, ["x"])
    with pytest.raises(InvalidParameterValue):
        await transform(rt, "zero-shot-classification", ["x"], {"candidate_labels": []})
    assert await transform(rt, "text-classification", []) == []
    # Still usable afterwards.
    assert len(await transform(rt, "text-classification", ["fine"])) == 1


async def test_models_info_lists_loaded(rt: Runtime) -> None:
    info = rt.models_info()
    assert info and all({"name", "engine", "device", "memory_bytes", "loaded_at"} <= set(m) for m in info)
    # engine = "auto" on a CPU: every pipeline runs its ONNX export; the export's files are its weight.
    assert all(m["engine"] == "onnx" and m["device"] == "cpu" and m["memory_bytes"] > 0 for m in info)
