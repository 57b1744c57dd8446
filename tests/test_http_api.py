"""The OpenAI-compatible HTTP API of the real proxy, driven by the official `openai` client.

A proxy process runs with its HTTP listener on a free port in front of the test Postgres;
the same models answer over SQL (psycopg through the proxy) and over HTTP, and the answers
are compared: embeddings (MiniLM) by cosine, SmolLM2 chat and completions greedy, by text.
Errors are checked for their status and OpenAI's error shape. A second proxy with a tiny
queue shows 429 from the batcher, 503 while draining, and the deprecated metrics port.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psycopg
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from testing.postgres import free_port
from testing.proxy import TEST_CONFIG, ProxyProcess, start_proxy

pytestmark = pytest.mark.slow
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "sk-test-key"
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a long poem about the sea."},
]


def _config(tmp: Path, http: str, runtime: str = "") -> Path:
    base = TEST_CONFIG.read_text().replace("[runtime]\n", "[runtime]\n" + runtime, 1)
    path = tmp / "config.toml"
    path.write_text(base + "\n[http]\n" + http)
    return path


@pytest.fixture(scope="module")
def api(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, str]]:
    port = free_port()
    # batch_wait_ms: a batch stays open long enough for a SQL and an HTTP caller to meet in it.
    config = _config(tmp_path_factory.mktemp("http-api"),
                     f'listen = "127.0.0.1:{port}"\napi_keys = {{"{KEY}" = "postgres"}}\n'
                     "max_tokens = 64\nmax_n = 4\nmax_body_bytes = 65536\n",
                     "batch_wait_ms = 1000\n")
    proxy = start_proxy(pg_dsn, "session", config=config)
    yield proxy, f"http://127.0.0.1:{port}"
    proxy.stop()


@pytest.fixture(scope="module")
def client(api: tuple[ProxyProcess, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=api[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _sql(proxy: ProxyProcess, query: str, *args: Any) -> Any:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute(query, args).fetchone()
        assert row is not None
        return row[0]


def _tokenizers() -> tuple[Any, Any]:
    """MiniLM's and SmolLM2's own tokenizers, from the folders the proxy loads them from."""
    import importlib

    auto: Any = importlib.import_module("transformers").AutoTokenizer

    from runtime.config import RuntimeConfig
    from runtime.gguf import ensure_transformers_folder
    from runtime.resolve import Resolver

    config = RuntimeConfig.from_mapping({})
    resolver = Resolver(config)
    minilm = auto.from_pretrained(str(resolver.resolve(MINILM).path))
    smol = auto.from_pretrained(str(ensure_transformers_folder(config, resolver.resolve(SMOL))))
    return minilm, smol


def _cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --- embeddings ------------------------------------------------------------------------------------
def test_embeddings_equal_pgml_embed(api: tuple[ProxyProcess, str], client: openai.OpenAI) -> None:
    texts = ["hello world", "The quick brown fox jumps over the lazy dog."]
    out = client.embeddings.create(model=MINILM, input=texts)  # base64, as the client asks by default
    as_float = client.embeddings.create(model=MINILM, input=texts[0], encoding_format="float")
    assert [d.index for d in out.data] == [0, 1] and out.model == MINILM
    for text, got in zip(texts, out.data, strict=True):
        want = _sql(api[0], "SELECT pgml.embed(%s, %s)", MINILM, text)
        assert len(got.embedding) == len(want) == 384
        assert _cos(got.embedding, want) > 0.9999
    assert _cos(as_float.data[0].embedding, out.data[0].embedding) > 0.9999
    minilm, _ = _tokenizers()
    assert out.usage.prompt_tokens == sum(len(minilm(t)["input_ids"]) for t in texts)
    assert out.usage.total_tokens == out.usage.prompt_tokens


def test_embeddings_dimensions(api: tuple[ProxyProcess, str], client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=MINILM, input="a cat", dimensions=64, encoding_format="float")
    vec = np.asarray(out.data[0].embedding)
    assert vec.shape == (64,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    full = np.asarray(_sql(api[0], "SELECT pgml.embed(%s, 'a cat')", MINILM))[:64]
    assert _cos(vec, full) > 0.9999
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MINILM, input="a cat", dimensions=1000)
    assert err.value.status_code == 400 and _error(err.value)["param"] == "dimensions"


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {MINILM, SMOL} <= ids
    assert client.models.retrieve(MINILM).id == MINILM
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such/model-xyz")


# --- generation ------------------------------------------------------------------------------------
def test_chat_equals_pgml_transform(api: tuple[ProxyProcess, str], client: openai.OpenAI) -> None:
    want = _sql(api[0], "SELECT pgml.transform(task => %s::jsonb, inputs => %s::jsonb[], args => %s::jsonb)",
                json.dumps({"task": "conversational", "model": SMOL}), [json.dumps(m) for m in CHAT],
                json.dumps({"max_new_tokens": 8, "do_sample": False}))
    out = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=8, temperature=0,
                                         seed=1, user="tester")
    assert [c.message.content for c in out.choices] == want
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.role == "assistant"
    _, smol = _tokenizers()
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(smol.apply_chat_template(CHAT, add_generation_prompt=True))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8

    stream = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want[0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_stream_disconnect_stops_the_generation(client: openai.OpenAI) -> None:
    """A client that closes a streamed chat completion stops its generation: the model (whose
    lock streams and batches share) answers the next request at once instead of after the rest
    of the stream. The yardstick is the same stream read to its end, in this session."""
    args: dict[str, Any] = {"model": SMOL, "messages": CHAT, "max_tokens": 64, "temperature": 0}
    client.chat.completions.create(**{**args, "max_tokens": 1})  # loaded before anything is timed
    start = time.perf_counter()
    whole = list(client.chat.completions.create(**args, stream=True))
    full_s = time.perf_counter() - start
    assert [c.choices[0].finish_reason for c in whole if c.choices][-1] == "length"  # it runs 64 tokens

    stream = client.chat.completions.create(**args, stream=True)
    for seen, _ in enumerate(stream):
        if seen == 2:  # the role chunk and two pieces of text
            break
    stream.close()  # the connection goes away with most of the 64 tokens still to generate
    start = time.perf_counter()
    after = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=1, temperature=0)
    waited_s = time.perf_counter() - start
    assert after.choices[0].finish_reason == "length"
    assert waited_s < full_s / 2, (waited_s, full_s)


def test_seeded_sampling_answers_the_same_twice(client: openai.OpenAI) -> None:
    def sample(seed: int, stream: bool = False) -> str:
        args: dict[str, Any] = {"model": SMOL, "messages": CHAT, "max_tokens": 12, "temperature": 1.5,
                                "seed": seed}
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**args, stream=True) if c.choices)
        return client.chat.completions.create(**args).choices[0].message.content or ""

    first = sample(7)
    assert first and sample(7) == first
    streamed = sample(7, stream=True)  # its own generate loop: seeded alike, not the batch's draws
    assert streamed and sample(7, stream=True) == streamed
    assert len({sample(seed) for seed in (1, 2, 3)} | {first}) > 1  # the seed is what decides


def test_chat_n_and_stop(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=8, temperature=0, n=2)
    answers = [c.message.content or "" for c in full.choices]
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: n equal answers
    words = answers[0].split()
    cut = client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=8, temperature=0,
                                         stop=[words[1]])
    assert cut.choices[0].message.content == answers[0][: answers[0].index(words[1])]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_equal_pgml_transform(api: tuple[ProxyProcess, str], client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    args = {"max_new_tokens": 8, "do_sample": False, "return_full_text": False}
    sql = "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY[%s], args => %s::jsonb)"
    task = json.dumps({"task": "text-generation", "model": SMOL})
    [[want]] = _sql(api[0], sql, task, prompt, json.dumps(args))
    out = client.completions.create(model=SMOL, prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == want["generated_text"]
    _, smol = _tokenizers()
    assert out.usage is not None and out.usage.prompt_tokens == len(smol(prompt)["input_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=SMOL, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == want["generated_text"]


# --- one batch for SQL and HTTP --------------------------------------------------------------------
def _model_stat(base: str, metric: str, model: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"pgml_proxy_model_{metric}_total" and model in sample.labels["name"]:
                return float(sample.value)
    raise AssertionError(f"no {metric} for {model} in /metrics")


def test_one_batch_serves_sql_and_http(api: tuple[ProxyProcess, str], client: openai.OpenAI) -> None:
    proxy, base = api
    client.embeddings.create(model=MINILM, input="warm up")  # loaded before the two meet
    batches, items = _model_stat(base, "batches", MINILM), _model_stat(base, "items", MINILM)
    start = threading.Barrier(2)
    got: dict[str, Any] = {}

    def sql() -> None:
        start.wait()
        got["sql"] = _sql(proxy, "SELECT pgml.embed(%s, 'from sql')", MINILM)

    def http() -> None:
        start.wait()
        got["http"] = client.embeddings.create(model=MINILM, input="from http").data[0].embedding

    threads = [threading.Thread(target=sql), threading.Thread(target=http)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got["sql"]) == len(got["http"]) == 384
    assert _model_stat(base, "batches", MINILM) == batches + 1  # one batch ...
    assert _model_stat(base, "items", MINILM) == items + 2  # ... of both callers


# --- errors ------------------------------------------------------------------------------------------
def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def test_auth_errors(api: tuple[ProxyProcess, str]) -> None:
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=api[1] + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            bad.embeddings.create(model=MINILM, input="x")
        assert err.value.status_code == 401 and _error(err.value)["code"] == "invalid_api_key"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="no-such/model-xyz", input="x")
    assert _error(err.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such/model-xyz", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such/model-xyz", messages=CHAT, max_tokens=2, stream=True)


def test_bad_requests_are_400(api: tuple[ProxyProcess, str], client: openai.OpenAI) -> None:
    base, auth = api[1], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(base + "/v1/embeddings", content=b'{"model": ', headers=auth)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(base + "/v1/chat/completions", json={"messages": CHAT}, headers=auth)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    for field, value in (("n", 1000), ("max_tokens", 10**6), ("temperature", 5)):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=SMOL, messages=CHAT, **{field: value})  # type: ignore[call-overload]
        assert _error(err.value)["param"] == field
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MINILM, input=[[1, 2, 3]])
    huge = httpx.post(base + "/v1/embeddings", headers=auth,
                      content=json.dumps({"model": MINILM, "input": "x" * 100_000}).encode())
    assert huge.status_code == 413 and set(huge.json()["error"]) == {"message", "type", "param", "code"}
    # The connection and the API stay usable.
    assert len(client.embeddings.create(model=MINILM, input="still here").data) == 1


# --- 429 from the batcher's queue, 503 while draining, the old metrics port ----------------------------
def test_queue_full_is_429_and_draining_is_503(pg_dsn: str, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    config = _config(tmp_path, f'listen = "127.0.0.1:{port}"\n',
                     "queue_size = 2\nmax_batch_size = 1\nbatch_wait_ms = 0\n")
    proxy = start_proxy(pg_dsn, "session", config=config, metrics_port=metrics_port)
    try:
        assert "metrics_port is deprecated" in proxy.log()
        assert "pgml_proxy_queries" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "pgml_proxy_queries" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=120)
        statuses = _flood(client, "word " * 200, 16)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        with psycopg.connect(proxy.dsn()) as conn:
            conn.execute("SELECT 1")  # a transaction left open: the drain waits for it
            proxy.send_signal(signal.SIGINT)
            time.sleep(0.5)
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings",
                                json={"model": MINILM, "input": "x"})
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable"
    finally:
        proxy.stop()


def _flood(client: openai.AsyncOpenAI, text: str, n: int) -> list[int]:
    import asyncio

    async def one() -> int:
        try:
            await client.embeddings.create(model=MINILM, input=text)
            return 200
        except openai.APIStatusError as exc:
            _error(exc)
            return exc.status_code

    async def run() -> list[int]:
        await one()  # loaded first: the flood meets a running model
        return list(await asyncio.gather(*(one() for _ in range(n))))

    return asyncio.run(run())
