"""PostgresML's own SDKs through `make run`'s proxy, called as their users write them.

- `pgml` (PyPI 1.1.1): the product README's `OpenSourceAI.chat_completions_create` example,
  verbatim but for the database URL (its model, `santiadavani/fingpt-llama2-7b-chat`, is aliased
  to SmolLM2 in tests/models.test.toml), then the streaming and async forms. The SDK sends
  `pgml.transform(task => $1, inputs => $2::jsonb[], args => $3)` with binary parameters, and
  streams through `DECLARE c CURSOR FOR SELECT pgml.transform_stream(...)` and `FETCH 1`.
- `korvus` (PyPI 1.1.5), the RAG SDK: a collection and a pipeline on two fields (a splitter,
  semantic search on all-MiniLM-L6-v2 and full-text search on the body; semantic search on the
  title), BBC News articles upserted, `vector_search`, `search`, `rag` with SmolLM2, and
  `delete_documents`. Korvus's SQL has pgml calls in CTEs, a set-returning `pgml.chunk` in a
  select list read as `(chunk_t).chunk_index`, `pgml.embed` over `array_agg(chunk)`, upserts, and
  `runtime = $2::pgml.runtime`.

Both SDKs are Rust (sqlx, tokio) under pyo3: each scenario runs in its own interpreter, which
prints one JSON line and leaves with os._exit, as the SDKs' threads can abort a Python that
finalises around them.
"""

# The README example below is kept verbatim, long lines included.
# ruff: noqa: E501
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from testing.bbc import bbc
from tests.fix_makerun import make_run

pytestmark = pytest.mark.slow

# The product README's example (section "Inference" of "LLM Fine-tuning"), verbatim.
README_EXAMPLE = '''
import pgml

database_url = "DATABASE_URL"

client = pgml.OpenSourceAI(database_url)

results = client.chat_completions_create(
    {
        "model" : "santiadavani/fingpt-llama2-7b-chat",
        "token" : "TOKEN",
        "load_in_8bit": "true",
        "temperature" : 0.1,
        "repetition_penalty" : 1.5,
    },
    [
        {
            "role" : "system",
            "content" : "What is the sentiment of this news? Please choose an answer from {strong negative/moderately negative/mildly negative/neutral/mildly positive/moderately positive/strong positive}.",
        },
        {
            "role": "user",
            "content": "Starbucks says the workers violated safety policies while workers said they'd never heard of the policy before and are alleging retaliation.",
        },
    ]
)

print(results)
'''
# The README's documented answer, whose shape the SDK's answer through the proxy must have.
README_RESULT = {
    "choices": [{"index": 0, "message": {"content": " Moderately negative ", "role": "assistant"}}],
    "created": 1711144872,
    "id": "b663f701-db97-491f-b186-cae1086f7b79",
    "model": "santiadavani/fingpt-llama2-7b-chat",
    "object": "chat.completion",
    "system_fingerprint": "e36f4fa5-3d0b-e354-ea4f-950cd1d10787",
    "usage": {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0},
}
CHAT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"  # one of the SDK's named models; aliased to SmolLM2
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def sdk_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with make_run(tmp_path_factory, "sdk") as dsn:
        yield dsn


def run_sdk(code: str, timeout: float = 900) -> Any:
    """Run `code` in a fresh interpreter; it ends by printing one JSON line, `out(value)`."""
    prelude = "import json, os, sys\ndef out(v):\n    print('RESULT ' + json.dumps(v), flush=True)\n    os._exit(0)\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the SDK script failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def test_pgml_readme_example_verbatim(sdk_dsn: str) -> None:
    # The README's code, with its database URL; `results` is what it prints.
    code = README_EXAMPLE.replace('"DATABASE_URL"', repr(sdk_dsn)).replace("print(results)", "out(results)")
    results = run_sdk(code)
    assert shape(results) == shape(README_RESULT), results
    assert results["object"] == "chat.completion"
    assert results["model"] == "santiadavani/fingpt-llama2-7b-chat"
    message = results["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip(), results


def test_pgml_streaming_and_async_forms_agree(sdk_dsn: str) -> None:
    code = textwrap.dedent(f"""
        import asyncio
        import pgml
        client = pgml.OpenSourceAI({sdk_dsn!r})
        messages = {MESSAGES!r}
        sync = client.chat_completions_create({CHAT_MODEL!r}, messages, 24, 0.1)
        chunks = list(client.chat_completions_create_stream({CHAT_MODEL!r}, messages, 24, 0.1))
        async def forms():
            a = await client.chat_completions_create_async({CHAT_MODEL!r}, messages, 24, 0.1)
            it = await client.chat_completions_create_stream_async({CHAT_MODEL!r}, messages, 24, 0.1)
            return a, [c async for c in it]
        a, achunks = asyncio.run(forms())
        out({{"sync": sync, "chunks": chunks, "async": a, "achunks": achunks}})
    """)
    r = run_sdk(code)
    answer = r["sync"]["choices"][0]["message"]["content"]
    assert answer.strip() and r["sync"]["object"] == "chat.completion"
    # Greedy decoding: the stream's pieces, joined, are the same answer, as are the async forms.
    for chunks in (r["chunks"], r["achunks"]):
        assert len(chunks) > 1, chunks
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks).strip() == answer.strip()
    assert r["async"]["choices"][0]["message"]["content"] == answer


def test_korvus_quickstart_on_bbc_news(sdk_dsn: str) -> None:
    articles = bbc(4, CATEGORIES, chars=1200)
    documents = []
    for i, (text, category) in enumerate(articles):
        title, _, body = text.strip().partition("\n")
        documents.append({"id": str(i), "title": title.strip(), "text": body.strip(), "category": category})
    sport_ids = [d["id"] for d in documents if d["category"] == "sports"]
    code = textwrap.dedent(f"""
        import asyncio
        from korvus import Collection, Pipeline
        async def main():
            collection = Collection("bbc_news", {sdk_dsn!r})
            pipeline = Pipeline("v1", {{
                "text": {{
                    "splitter": {{"model": "recursive_character",
                                  "parameters": {{"chunk_size": 600, "chunk_overlap": 40}}}},
                    "semantic_search": {{"model": "sentence-transformers/all-MiniLM-L6-v2"}},
                    "full_text_search": {{"configuration": "english"}},
                }},
                "title": {{"semantic_search": {{"model": "sentence-transformers/all-MiniLM-L6-v2"}}}},
            }})
            await collection.add_pipeline(pipeline)
            await collection.upsert_documents({documents!r})
            query = "Which team won the match, and who scored the goals for the club?"
            hits = await collection.vector_search(
                {{"query": {{"fields": {{"text": {{"query": query}}, "title": {{"query": query}}}}}},
                  "limit": 3}}, pipeline)
            found = await collection.search(
                {{"query": {{"full_text_search": {{"text": {{"query": "minister"}}}},
                            "semantic_search": {{"text": {{"query": "the government and the prime minister"}}}}}},
                  "limit": 3}}, pipeline)
            rag = await collection.rag({{
                "CONTEXT": {{
                    "vector_search": {{"query": {{"fields": {{"text": {{"query": query}}}}}},
                                       "document": {{"keys": ["id"]}}, "limit": 2}},
                    "aggregate": {{"join": "\\n"}},
                }},
                "chat": {{
                    "model": {CHAT_MODEL!r},
                    "messages": [
                        {{"role": "system", "content": "You are a helpful assistant. Answer briefly."}},
                        {{"role": "user", "content": "Given the context\\n:{{CONTEXT}}\\nAnswer: " + query}},
                    ],
                    "max_tokens": 24,
                }},
            }}, pipeline)
            before = len(await collection.get_documents({{"limit": 100}}))
            await collection.delete_documents({{"category": {{"$eq": "tech"}}}})
            after = await collection.get_documents({{"limit": 100}})
            return {{"hits": hits, "found": found, "rag": rag, "before": before,
                     "after": [d["document"]["category"] for d in after]}}
        out(asyncio.run(main()))
    """)
    r = run_sdk(code)
    hits = r["hits"]
    assert len(hits) == 3
    # MiniLM puts a sports article first for a football question.
    assert hits[0]["document"]["category"] == "sports", [h["document"]["category"] for h in hits]
    assert hits[0]["document"]["id"] in sport_ids
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # Full-text and semantic scores together: a politics article that says "minister" leads.
    found = r["found"]["results"]
    top = found[0]["document"]
    assert top["category"] == "politics" and "minister" in top["text"].lower(), [f["document"]["id"] for f in found]
    assert [f["score"] for f in found] == sorted((f["score"] for f in found), reverse=True)
    answer = r["rag"]["rag"]
    assert isinstance(answer, list) and isinstance(answer[0], str) and answer[0].strip(), r["rag"]
    assert r["rag"]["sources"]["CONTEXT"][0]["document"]["id"] in sport_ids
    assert r["before"] == len(documents)
    assert len(r["after"]) == len(documents) - 4 and "tech" not in r["after"]
