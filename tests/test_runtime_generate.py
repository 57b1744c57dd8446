"""Generation with the real SmolLM2-135M-Instruct (GGUF): greedy text, chat template, streaming."""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import FeatureNotSupported, InvalidParameterValue
from core.interfaces import CallContext
from runtime import Runtime
from runtime.gguf import ensure_transformers_folder
from testing.tiny_models import build_all

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GREEDY = {"max_new_tokens": 16, "do_sample": False}
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


async def _notice(_: str) -> None:
    return None


CTX = CallContext(notice=_notice)


@pytest.fixture(scope="module")
async def rt() -> AsyncIterator[Runtime]:
    tiny = build_all(".cache/tiny-models")
    runtime = Runtime(
        {
            "device": "cpu",
            "threads": 2,
            "cache_dir": ".cache/pgml-proxy-test",
            "aliases": {"zephyr": SMOL, "tiny-chat": str(tiny / "llama-chat")},
        },
        "",
    )
    await runtime.start()
    yield runtime
    await runtime.close()


@pytest.fixture(scope="module")
def reference(rt: Runtime) -> tuple[Any, Any]:
    """transformers' own model and tokenizer, from the same GGUF (converted by transformers)."""
    transformers: Any = importlib.import_module("transformers")
    folder: Path = ensure_transformers_folder(rt.config, rt.resolver.resolve(SMOL))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(folder))


async def test_greedy_text_equals_generate(rt: Runtime, reference: tuple[Any, Any]) -> None:
    import torch

    model, tok = reference
    prompt = "The capital of France is"
    [out] = await rt.call_batch(
        "transform",
        [{"task": {"task": "text-generation", "model": SMOL}, "args": GREEDY, "inputs": [prompt]}],
        CTX,
    )
    with torch.no_grad():
        ids = model.generate(**tok(prompt, return_tensors="pt"), **GREEDY)
    assert out == [[{"generated_text": tok.decode(ids[0], skip_special_tokens=True)}]]


async def test_chat_uses_the_template(rt: Runtime, reference: tuple[Any, Any]) -> None:
    import torch

    model, tok = reference
    [out] = await rt.call_batch(
        "transform",
        [{"task": {"task": "conversational", "model": "zephyr"}, "args": GREEDY, "inputs": [CHAT]}],
        CTX,
    )
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, **GREEDY)
    want = tok.decode(ids[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(out) == 1 and isinstance(out[0], str) and out[0] == want
    assert "Paris" in want  # the real model answers: the template was applied


async def test_stream_yields_pieces_that_add_up(rt: Runtime) -> None:
    [full] = await rt.call_batch(
        "transform",
        [{"task": {"task": "text-generation", "model": SMOL}, "args": GREEDY, "inputs": [CHAT]}],
        CTX,
    )
    pieces = [
        p
        async for p in rt.stream(
            "transform_stream",
            {"task": {"task": "text-generation", "model": SMOL}, "args": GREEDY, "inputs": [CHAT]},
            CTX,
        )
    ]
    assert len(pieces) > 1 and all(isinstance(p, list) and len(p) == 1 for p in pieces)
    assert "".join(p[0] for p in pieces) == full[0]
    text_pieces = [
        p
        async for p in rt.stream(
            "transform_stream",
            {"task": {"task": "text-generation", "model": SMOL}, "args": GREEDY, "input": "Once upon a time"},
            CTX,
        )
    ]
    assert all(isinstance(p, str) for p in text_pieces) and len("".join(text_pieces)) > 10


async def test_stream_stops_when_the_client_goes(rt: Runtime) -> None:
    call = {
        "task": {"task": "text-generation", "model": "tiny-chat"},
        "args": {"max_new_tokens": 400, "do_sample": False},
        "input": "hello",
    }
    gen = rt.stream("transform_stream", call, CTX)
    assert isinstance(gen, AsyncGenerator)
    first = await gen.__anext__()
    await gen.aclose()  # what the planner does when the query is cancelled
    assert isinstance(first, str)
    # The model is free again at once (a still-running generate would hold its lock for 400 tokens).
    [again] = await rt.call_batch(
        "transform",
        [{"task": call["task"], "args": {"max_new_tokens": 2, "do_sample": False}, "inputs": ["hi"]}],
        CTX,
    )
    assert len(again) == 1


async def test_stream_errors(rt: Runtime) -> None:
    with pytest.raises(InvalidParameterValue, match="text generation"):
        async for _ in rt.stream(
            "transform_stream", {"task": "text-classification", "args": {}, "input": "x"}, CTX
        ):
            pass
    with pytest.raises(FeatureNotSupported):
        async for _ in rt.stream(
            "transform_stream",
            {"task": {"task": "text-generation", "model": "tiny-chat"}, "args": {}, "inputs": [CHAT, CHAT]},
            CTX,
        ):
            pass


async def test_transform_stream_rows_through_call_batch(rt: Runtime) -> None:
    call = {"task": {"task": "text-generation", "model": SMOL}, "args": GREEDY, "input": "Once upon a time"}
    [rows] = await rt.call_batch("transform_stream", [call], CTX)
    streamed = [p async for p in rt.stream("transform_stream", call, CTX)]
    assert len(rows) > 1 and all(len(r) == 1 and isinstance(r[0], str) for r in rows)
    assert [r[0] for r in rows] == streamed  # the same rows as the live stream, all at once
