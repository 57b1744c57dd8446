"""Runtime pieces without models: config validation, resolution, the batcher, chunk splitters."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from core.errors import (
    ConfigError,
    FeatureNotSupported,
    InsufficientPrivilege,
    InsufficientResources,
    InvalidParameterValue,
    UndefinedFunction,
    UndefinedModel,
)
from core.interfaces import CallContext
from runtime import Runtime, RuntimeConfig
from runtime.batcher import Batcher
from runtime.chunk import split
from runtime.config import HF_DEFAULT_MODELS
from runtime.resolve import Resolver


async def _notice(_: str) -> None:
    return None


CTX = CallContext(notice=_notice)


# --- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_overrides() -> None:
    cfg = RuntimeConfig.from_mapping(
        {
            "device": "cpu",
            "max_batch_size": 8,
            "preload": ["embed:x"],
            "default_models": {"text-generation": "gpt2"},
        }
    )
    assert cfg.device == "cpu" and cfg.max_batch_size == 8 and cfg.preload == ("embed:x",)
    assert cfg.default_models["text-generation"] == "gpt2"
    # Tasks not overridden keep Hugging Face's default.
    assert cfg.default_models["summarization"] == HF_DEFAULT_MODELS["summarization"]
    assert RuntimeConfig.from_mapping({}).trust_remote_code is False


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"batch_size": 3}, "runtime.batch_size"),
        ({"device": "tpu"}, "runtime.device"),
        ({"engine": "tensorrt"}, "runtime.engine"),
        ({"max_batch_size": 0}, "runtime.max_batch_size"),
        ({"queue_size": True}, "runtime.queue_size"),
        ({"aliases": {"a": 1}}, "runtime.aliases"),
        ({"preload": "x"}, "runtime.preload"),
        ({"batch_wait_ms": -1}, "runtime.batch_wait_ms"),
    ],
)
def test_config_rejects_bad_keys(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_mapping(raw)
    assert info.value.key == key


# --- resolution -----------------------------------------------------------------------------------
def test_unknown_model_names_every_place_looked(tmp_path: Path) -> None:
    cfg = RuntimeConfig.from_mapping({"models_dir": str(tmp_path), "aliases": {"nick": "no/such-model"}})
    with pytest.raises(UndefinedModel) as info:
        Resolver(cfg).resolve("nick")
    err = info.value
    assert err.sqlstate == "42704" and '"nick"' in err.message and "'no/such-model'" in err.message
    detail = err.fields["D"]
    # The places are named, the server's folders are not (issue 15).
    assert "models_dir" in detail and "Hugging Face cache" in detail and "HF_HUB_OFFLINE" in detail
    assert str(tmp_path) not in str(err.fields)


def test_models_dir_and_builtin_minilm(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    resolver = Resolver(RuntimeConfig.from_mapping({"models_dir": str(tmp_path)}))
    assert resolver.resolve("mine").path == tmp_path / "mine"
    minilm = resolver.resolve("sentence-transformers/all-MiniLM-L6-v2")
    assert (minilm.path / "modules.json").is_file() and len(minilm.key) == 16


def test_hf_cache_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A model placed in the standard cache layout by any means is found (no network).
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    refs = tmp_path / "hub" / "models--acme--tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = Resolver(RuntimeConfig.from_mapping({"models_dir": str(tmp_path / "none")})).resolve("acme/tiny")
    assert found.path == snap and found.key == "abc123"


def test_allow_list_is_42501() -> None:
    resolver = Resolver(RuntimeConfig.from_mapping({"allowed_models": ["all-MiniLM-L6-v2"]}))
    assert resolver.resolve("all-MiniLM-L6-v2").path.is_dir()
    with pytest.raises(InsufficientPrivilege) as info:
        resolver.resolve("gpt2")
    assert info.value.sqlstate == "42501" and "gpt2" in info.value.message


# --- batcher --------------------------------------------------------------------------------------
def _recording_batcher(**kw: float) -> tuple[Batcher, list[list[str]]]:
    from concurrent.futures import ThreadPoolExecutor

    seen: list[list[str]] = []
    gate = threading.Event()
    gate.set()

    def run(batch: list[str]) -> list[str]:
        gate.wait()
        seen.append(list(batch))
        return [s.upper() for s in batch]

    params = {"max_batch_size": 4, "max_batch_tokens": 1000, "wait_s": 0.02, "queue_size": 100, **kw}
    b = Batcher("test", run, ThreadPoolExecutor(2), **params)  # type: ignore[arg-type]
    return b, seen


async def test_batcher_batches_across_callers_and_sorts_by_length() -> None:
    b, seen = _recording_batcher(max_batch_size=8, wait_s=0.05)
    words = ["ccc", "a", "bb", "dddd", "e", "ff"]
    results = await asyncio.gather(*(b.submit([w], [len(w)]) for w in words))
    assert [r[0] for r in results] == [w.upper() for w in words]  # each caller its own answer
    assert sum(len(s) for s in seen) == len(words) and len(seen) < len(words)
    assert all([len(x) for x in s] == sorted(len(x) for x in s) for s in seen)
    await b.close()


async def test_batcher_closes_on_size_and_token_budget() -> None:
    b, seen = _recording_batcher(max_batch_size=3, max_batch_tokens=10, wait_s=0.05)
    out = await b.submit([f"w{i}" for i in range(7)], [1] * 7)
    assert out == [f"W{i}" for i in range(7)]
    assert max(len(s) for s in seen) <= 3
    seen.clear()
    await b.submit(["x"] * 4, [6] * 4)  # 6 + 6 > 10: one item a batch
    assert [len(s) for s in seen] == [1, 1, 1, 1]
    await b.close()


async def test_batcher_full_queue_is_53000() -> None:
    b, _ = _recording_batcher(queue_size=8)
    # One statement's many rows go in slices, never all at once: no 53000 from an idle model.
    assert await b.submit(["x"] * 20, [1] * 20) == ["X"] * 20
    await b.close()
    # Callers that together fill the queue (the model is stuck): the next one is refused at once.
    gate = threading.Event()

    def stuck(batch: list[str]) -> list[str]:
        gate.wait(5)
        return batch

    from concurrent.futures import ThreadPoolExecutor

    b = Batcher("stuck", stuck, ThreadPoolExecutor(2), max_batch_size=4, wait_s=0.0, queue_size=8)
    callers = [asyncio.ensure_future(b.submit(["y"], [1])) for _ in range(12)]
    await asyncio.sleep(0.1)
    gate.set()
    done = await asyncio.gather(*callers, return_exceptions=True)
    # The first eight fill the queue before the owner takes any; the other four are refused.
    assert done[:8] == [["y"]] * 8
    assert all(isinstance(d, InsufficientResources) and d.sqlstate == "53000" for d in done[8:])
    assert "full" in str(done[8])
    assert await b.submit(["ok"], [1]) == ["ok"]  # still usable
    await b.close()


async def test_batcher_drops_cancelled_work() -> None:
    from concurrent.futures import ThreadPoolExecutor

    started = threading.Event()
    release = threading.Event()
    seen: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        started.set()
        release.wait(5)
        seen.append(list(batch))
        return batch

    b = Batcher(
        "cancel",
        run,
        ThreadPoolExecutor(1),
        max_batch_size=2,
        max_batch_tokens=100,
        wait_s=0.0,
        queue_size=100,
        in_flight=1,
    )
    first = asyncio.ensure_future(b.submit([1], [1]))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    doomed = asyncio.ensure_future(b.submit([2, 3], [1, 1]))
    await asyncio.sleep(0.01)
    doomed.cancel()
    release.set()
    assert await first == [1]
    assert await b.submit([4], [1]) == [4]
    assert [2, 3] not in seen and all(2 not in s and 3 not in s for s in seen)
    assert b.stats.dropped_cancelled >= 2
    await b.close()


async def test_batcher_failure_reaches_only_that_batch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(batch: list[str]) -> list[object]:
        return [InvalidParameterValue("bad item") if s == "bad" else s for s in batch]

    b = Batcher(
        "mixed",
        run,
        ThreadPoolExecutor(1),
        max_batch_size=8,
        max_batch_tokens=100,
        wait_s=0.02,
        queue_size=100,
    )
    good: object
    bad: object
    good, bad = await asyncio.gather(b.submit(["good"], [1]), b.submit(["bad"], [1]), return_exceptions=True)
    assert good == ["good"]
    assert isinstance(bad, InvalidParameterValue) and bad.sqlstate == "22023"
    await b.close()


async def test_model_work_runs_off_the_event_loop() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def slow(batch: list[int]) -> list[int]:
        time.sleep(0.3)
        return batch

    b = Batcher(
        "slow", slow, ThreadPoolExecutor(1), max_batch_size=2, max_batch_tokens=10, wait_s=0.0, queue_size=10
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.ensure_future(ticker())
    await b.submit([1], [1])
    t.cancel()
    assert ticks >= 10  # the loop kept running while the model slept
    await b.close()


# --- chunk and facade errors ---------------------------------------------------------------------
def test_chunk_splitters() -> None:
    text = "# Title\n\nFirst paragraph is here.\n\nSecond paragraph, a little longer than the first one."
    pieces = split("recursive_character", text, {"chunk_size": 40, "chunk_overlap": 0})
    assert len(pieces) >= 3 and all(len(p) <= 40 for p in pieces)
    assert split("markdown", text, {"chunk_size": 1000})[0].startswith("# Title")
    code = "def a():\n    return 1\n\n\ndef b():\n    return 2\n"
    assert split("python", code, {"chunk_size": 25, "chunk_overlap": 0}) == [
        "def a():\n    return 1",
        "def b():\n    return 2",
    ]
    assert split("character", "a\n\nb\n\nc", {"chunk_size": 1, "chunk_overlap": 0}) == ["a", "b", "c"]
    assert (
        len(split("latex", r"\section{A} text \section{B} more", {"chunk_size": 20, "chunk_overlap": 0})) >= 2
    )


def test_chunk_errors() -> None:
    with pytest.raises(InvalidParameterValue, match="unknown splitter"):
        split("words", "x", {})
    with pytest.raises(InvalidParameterValue, match='unknown kwarg "size"'):
        split("character", "x", {"size": 3})
    with pytest.raises(InvalidParameterValue, match="larger chunk overlap"):
        split("character", "x", {"chunk_size": 2, "chunk_overlap": 5})
    with pytest.raises(FeatureNotSupported, match='needs the Python package "nltk"') as info:
        split("nltk", "x", {})
    assert (
        info.value.sqlstate == "0A000"
        and info.value.fields["H"] == "pip install nltk in the proxy's environment"
    )


async def test_facade_chunk_rows_and_dispatch_errors() -> None:
    rt = Runtime({"device": "cpu"}, "")
    await rt.start()
    try:
        rows = await rt.call_batch(
            "chunk",
            [
                {
                    "splitter": "recursive_character",
                    "text": "aaa bbb ccc",
                    "kwargs": {"chunk_size": 4, "chunk_overlap": 0},
                },
                {"splitter": "character", "text": "x", "kwargs": {}},
            ],
            CTX,
        )
        assert rows == [[(1, "aaa"), (2, "bbb"), (3, "ccc")], [(1, "x")]]
        with pytest.raises(UndefinedFunction) as info:
            await rt.call_batch("no_such_function", [{}], CTX)
        assert info.value.sqlstate == "42883"
        with pytest.raises(InvalidParameterValue, match="unknown task"):
            await rt.call_batch("transform", [{"task": "dance", "args": {}, "inputs": ["x"]}], CTX)
        with pytest.raises(InvalidParameterValue, match="kwargs must be a JSON object"):
            await rt.call_batch("embed", [{"transformer": "m", "text": "x", "kwargs": [1]}], CTX)
        with pytest.raises(InsufficientPrivilege, match="trust_remote_code"):
            await rt.call_batch(
                "embed",
                [{"transformer": "all-MiniLM-L6-v2", "text": "x", "kwargs": {"trust_remote_code": True}}],
                CTX,
            )
    finally:
        await rt.close()


async def test_a_folder_that_is_not_a_model_is_22023(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    rt = Runtime({"device": "cpu", "models_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache")}, "")
    await rt.start()
    try:
        with pytest.raises(InvalidParameterValue, match='model "broken" cannot be loaded') as info:
            await rt.call_batch(
                "transform",
                [{"task": {"task": "text-classification", "model": "broken"}, "args": {}, "inputs": ["x"]}],
                CTX,
            )
        assert info.value.sqlstate == "22023"
        assert rt.models_info() == []
    finally:
        await rt.close()


def test_tune_refuses_an_8bit_optimizer_without_bitsandbytes() -> None:
    """The README's conversation example asks for adamw_bnb_8bit: 0A000 naming the package, before any
    work (the Trainer used to fail inside the worker, reported as XX000)."""
    import importlib.util

    from core.errors import FeatureNotSupported
    from runtime.tune import args

    call = {"project_name": "p", "task": "text-classification", "relation_name": "t",
            "y_column_name": "class", "model_name": "m",
            "hyperparams": {"training_args": {"optim": "adamw_bnb_8bit"}}}
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(FeatureNotSupported, match="bitsandbytes"):
        args.parse(call)
    plain = {**call, "hyperparams": {"training_args": {"optim": "adamw_torch"}}}
    assert args.parse(plain).training_args == {"optim": "adamw_torch"}
