"""No statement waits for an ONNX export (issue 13), through the real proxy and Postgres.

With a fresh runtime cache the first `pgml.embed` of MiniLM is answered on torch while the
export runs in the background (SHOW MODELS says which engine served, and that the export was
still running); later calls run on ONNX Runtime; the answers before and after the switch agree
within the tolerance the engines' own comparison states (tests/test_runtime_embed.py: every
component within 1e-4; cosine > 0.9999 as in tests/test_http_api.py). A second proxy on the same
cache finds the export on disk and serves ONNX Runtime from its first call. In the runtime, tiny
models show the same for a classifier, and that a generator stays on torch for the process.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from core.interfaces import CallContext
from runtime import Runtime
from runtime.engines import pipeline_suffix
from testing.proxy import ROOT, TEST_CONFIG, ProxyProcess, start_proxy
from testing.tiny_models import build_all

pytestmark = pytest.mark.slow
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "PostgreSQL is a powerful, open source object-relational database system.",
    "How do I reset my password?",
    "a",
]


def _embed(p: ProxyProcess) -> np.ndarray:
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        rows = [conn.execute("SELECT pgml.embed(%s, %s)", (MINILM, s)).fetchone() for s in SENTENCES]
    return np.array([r[0] for r in rows if r is not None], dtype=np.float64)


def _minilm_models(p: ProxyProcess) -> list[dict[str, Any]]:
    with psycopg.connect(p.dsn(database="pgml_proxy"), autocommit=True) as admin:
        cur = admin.execute("SHOW MODELS")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return [r for r in rows if MINILM in str(r["name"]).split(", ")]


def test_first_embed_runs_on_torch_while_the_export_runs(pg_dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    cache = tmp_path / "cache"
    section = f'[runtime]\ncache_dir = "{cache}"\n'
    config.write_text(TEST_CONFIG.read_text().replace("[runtime]\n", section, 1))
    p = start_proxy(pg_dsn, "session", config=config)
    try:
        before = _embed(p)
        [first] = _minilm_models(p)
        # The engine that answered, and the export still running when it had: no clock involved.
        assert first["engine"] == "torch", first
        assert "serving while the ONNX export runs" in first["precision"], first
        deadline = time.monotonic() + 600
        while not any(m["engine"] == "onnx" for m in _minilm_models(p)):
            assert time.monotonic() < deadline, "the background export did not finish in 10 minutes"
            _embed(p)  # calls keep being answered (on torch) meanwhile
            time.sleep(1)
        after = _embed(p)
        assert np.abs(before - after).max() < 1e-4
        cosine = np.sum(before * after, axis=1) / (
            np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1)
        )
        assert cosine.min() > 0.9999, cosine
        # The torch model is unloaded once idle: one MiniLM left, on ONNX Runtime.
        deadline = time.monotonic() + 30
        while len(models := _minilm_models(p)) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [m["engine"] for m in models] == ["onnx"], models
        done = re.search(r"ONNX export done after [\d.]+ s \((\d+) statements served on torch", p.log())
        assert done and int(done.group(1)) >= 1, p.log()[-3000:]
    finally:
        p.stop()
    # The export is on disk now: a new proxy serves ONNX Runtime from the first call.
    second = start_proxy(pg_dsn, "session", config=config)
    try:
        again = _embed(second)
        assert [m["engine"] for m in _minilm_models(second)] == ["onnx"]
        assert np.abs(again - after).max() < 1e-5
        assert "serving on torch while its ONNX export runs" not in second.log()
    finally:
        second.stop()


async def _notice(_: str) -> None:
    return None


async def test_classification_switches_and_generation_stays(tmp_path: Path) -> None:
    """In the runtime itself, with tiny models: a classifier moves to ONNX Runtime once its
    export is loaded, with the same labels and scores within 1e-4; a generator keeps torch for
    the process (the same greedy text before and after) and its export is left on disk."""
    tiny = build_all(ROOT / ".cache/tiny-models")
    aliases = {"tiny-sentiment": str(tiny / "bert-sentiment"), "tiny-gpt2": str(tiny / "gpt2")}
    rt = Runtime({"device": "cpu", "cache_dir": str(tmp_path), "threads": 2, "aliases": aliases}, "")
    ctx = CallContext(notice=_notice)
    classify = {"task": {"task": "text-classification", "model": "tiny-sentiment"}, "args": {},
                "inputs": ["I love it", "I hate it"]}
    generate = {"task": {"task": "text-generation", "model": "tiny-gpt2"},
                "args": {"max_new_tokens": 6, "do_sample": False}, "inputs": ["Hello"]}
    await rt.start()
    try:
        [labels_before] = await rt.call_batch("transform", [classify], ctx)
        [text_before] = await rt.call_batch("transform", [generate], ctx)
        first = {m["name"]: m for m in rt.models_info()}
        for name in aliases:
            assert first[name]["engine"] == "torch", first
            assert "serving while the ONNX export runs" in first[name]["precision"], first

        def settled() -> bool:
            models = rt.models_info()
            return any(m["name"] == "tiny-sentiment" and m["engine"] == "onnx" for m in models) and any(
                m["name"] == "tiny-gpt2" and "on disk" in m["precision"] for m in models
            )

        deadline = time.monotonic() + 300
        while not settled():
            assert time.monotonic() < deadline, rt.models_info()
            await asyncio.sleep(0.2)
        [labels_after] = await rt.call_batch("transform", [classify], ctx)
        [text_after] = await rt.call_batch("transform", [generate], ctx)
        engines = {m["name"]: m["engine"] for m in rt.models_info()}
        assert engines == {"tiny-sentiment": "onnx", "tiny-gpt2": "torch"}, rt.models_info()
        assert [x["label"] for x in labels_after] == [x["label"] for x in labels_before]
        assert np.allclose([x["score"] for x in labels_after], [x["score"] for x in labels_before], atol=1e-4)
        assert text_after == text_before
        assert (tmp_path / "onnx").is_dir() and any(
            p.name.endswith(pipeline_suffix("text-generation")) for p in (tmp_path / "onnx").iterdir()
        )
    finally:
        await rt.close()
