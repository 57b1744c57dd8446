"""The LM runtime through the real proxy and planner, with real drivers (psycopg, asyncpg).

A proxy process is started with tests/config.test.toml plus the model aliases of
tests/models.test.toml, in front of the test Postgres.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import psycopg
import pytest

from testing.tiny_models import build_all
from tests.fix_proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lm_proxy(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    build_all(ROOT / ".cache/tiny-models")
    base = (ROOT / "tests/config.test.toml").read_text().replace("[runtime]\n", "", 1)
    config = tmp_path_factory.mktemp("lm-proxy") / "config.toml"
    config.write_text(base + "\n" + (ROOT / "tests/models.test.toml").read_text())
    proxy = start_proxy(pg_dsn, "session", config=config)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def minilm() -> Any:
    from sentence_transformers import SentenceTransformer

    from runtime.resolve import builtin_aliases

    return SentenceTransformer(builtin_aliases()["all-MiniLM-L6-v2"], device="cpu")


def test_embed_through_the_proxy(lm_proxy: ProxyProcess, minilm: Any) -> None:
    with psycopg.connect(lm_proxy.dsn(), autocommit=True) as conn:
        [vec] = (
            conn.execute("SELECT pgml.embed('intfloat/e5-small-v2', %s)", ["hello world"]).fetchone() or []
        )
        assert len(vec) == 384
        assert float(np.dot(vec, minilm.encode("hello world"))) > 0.999
        rows = conn.execute(
            "SELECT pgml.embed('all-MiniLM-L6-v2', inputs => ARRAY['a cat', 'a dog'])"
        ).fetchall()
        assert len(rows) == 2 and all(len(r[0]) == 384 for r in rows)


def test_readme_transform_examples(lm_proxy: ProxyProcess) -> None:
    with psycopg.connect(lm_proxy.dsn(), autocommit=True) as conn:
        [out] = (
            conn.execute(
                "SELECT pgml.transform(task => 'text-classification', inputs => ARRAY["
                "'I love how amazingly simple ML has become!', 'I hate doing mundane and thankless tasks.'])"
            ).fetchone()
            or []
        )
        assert len(out) == 2 and all(set(o) == {"label", "score"} for o in out)
        [qa] = (
            conn.execute(
                "SELECT pgml.transform('question-answering', inputs => ARRAY["
                """'{"question": "Where do I live?","""
                """ "context": "My name is Merve and I live in Istanbul."}'])"""
            ).fetchone()
            or []
        )
        assert set(qa) == {"score", "start", "end", "answer"}
        [fr] = (
            conn.execute(
                """SELECT pgml.transform(
                     task => '{"task": "translation", "model": "Helsinki-NLP/opus-mt-en-fr"}'::jsonb,
                                     inputs => ARRAY['How are you?'])"""
            ).fetchone()
            or []
        )
        assert len(fr) == 1 and set(fr[0]) == {"translation_text"}


def test_errors_keep_the_connection(lm_proxy: ProxyProcess) -> None:
    with psycopg.connect(lm_proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT pgml.embed('nobody/no-model', 'x')")
        assert info.value.sqlstate == "42704" and "nobody/no-model" in str(info.value)
        with pytest.raises(psycopg.Error) as info:
            conn.execute("""SELECT pgml.embed('all-MiniLM-L6-v2', 'x', '{"truncate_dim": -1}')""")
        assert info.value.sqlstate == "22023"
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_32_connections_embed_at_once(lm_proxy: ProxyProcess, minilm: Any) -> None:
    texts = [f"connection {i} writes about {('ships', 'bread', 'stars', 'law')[i % 4]}" for i in range(32)]
    want = minilm.encode(texts)

    async def one(text: str) -> list[float]:
        conn = await asyncpg.connect(lm_proxy.dsn())
        try:
            value = await conn.fetchval(
                "SELECT pgml.embed('sentence-transformers/all-MiniLM-L6-v2', $1)", text
            )
            return list(value)
        finally:
            await conn.close()

    got = np.array(await asyncio.gather(*(one(t) for t in texts)), dtype=np.float32)
    assert got.shape == (32, 384)
    assert np.sum(got * want, axis=1).min() > 0.999  # each connection got its own sentence's vector


def test_show_models_in_admin_database(lm_proxy: ProxyProcess) -> None:
    with psycopg.connect(lm_proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pgml.embed('all-MiniLM-L6-v2', 'warm')")
    with psycopg.connect(lm_proxy.dsn(database="pgml_proxy"), autocommit=True) as admin:
        cur = admin.execute("SHOW MODELS")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    assert {"name", "engine", "device", "memory_bytes"} <= set(names)
    # One load serves every name of a model; SHOW MODELS lists the names it was asked by.
    mini = [r for r in rows if "all-MiniLM-L6-v2" in r["name"].split(", ")]
    # With a fresh cache MiniLM serves on torch while its ONNX export runs in the background.
    assert mini and mini[0]["engine"] in ("onnx", "torch") and mini[0]["device"] == "cpu"
    assert mini[0]["engine"] == "onnx" or "ONNX export" in mini[0]["precision"], mini


def test_transform_stream_rows(lm_proxy: ProxyProcess) -> None:
    with psycopg.connect(lm_proxy.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            """SELECT * FROM pgml.transform_stream(
                 task => '{"task": "text-generation", "model": "gpt2"}'::jsonb,
                                                   args => '{"max_new_tokens": 8, "do_sample": false}',
                                                   input => 'Once upon a time')"""
        ).fetchall()
    assert len(rows) >= 2 and all(isinstance(r[0], str) for r in rows)
    assert json.dumps([r[0] for r in rows])
