"""`runtime.Runtime`: the planner's one entry point for every pgml function.

Owns dispatch by function name (each function's declaration in `core.functions` names the
`serve_<method>` that serves it), argument validation into SQLSTATE errors, model lookup
through the model cache (one load per model for every connection) and the thread pool that
all model work runs in. Language-model functions are served here; tabular ones by
`runtime.tabular.TabularRuntime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from core import functions
from core.errors import (
    FeatureNotSupported,
    InsufficientPrivilege,
    InvalidParameterValue,
    PgError,
    UndefinedFunction,
)
from core.functions import NotSupported, Served
from core.interfaces import CallContext
from runtime import chunk as chunking
from runtime import export_worker, hub, optional, utility
from runtime import transform as tf
from runtime.config import RuntimeConfig
from runtime.embed import MODEL_KWARGS, EmbedModel, RankModel, approx_tokens, embed_options, rank_rows
from runtime.engines import (
    Placement,
    choose,
    export_ready,
    pipeline_suffix,
    sentence_transformer_suffix,
)
from runtime.model_cache import Loaded, ModelCache, set_mmap_threshold
from runtime.resolve import Progress, ResolvedModel, Resolver

if TYPE_CHECKING:
    from runtime.tabular import TabularRuntime
    from runtime.tune import TuneRuntime

log = logging.getLogger(__name__)

# Builds a model object from (resolved model, placement, trust_remote_code).
_Build = Callable[[ResolvedModel, Placement, bool], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _Export:
    """How a model kind's ONNX export is checked and made apart from loading it."""

    ready: Callable[[ResolvedModel], bool]  # on disk: serving it is a load away
    kind: str  # what runtime.export_worker exports: "embed", "rank" or a transform task family
    # Whether later calls move to ONNX Runtime once the export is done. Not for generation: a
    # greedy answer can differ by a token between the engines, and one prompt should get one
    # answer for the life of a process (docs/DESIGN.md).
    switch: bool


@dataclasses.dataclass(slots=True)
class _ExportJob:
    """One model's background export and the torch model serving meanwhile."""

    torch_key: str
    state: str = "running"  # running | switched | kept (torch for this process) | failed
    started: float = dataclasses.field(default_factory=time.monotonic)
    torch_calls: int = 0  # statements served on torch while the export ran
    task: asyncio.Task[None] | None = None

# Options accepted for compatibility but not applied, with why: each gets a WARNING.
_EMBED_IGNORED = {
    "batch_size": "the proxy batches every connection's calls itself (runtime.max_batch_size)",
    "token": "downloads use the proxy's own HF_TOKEN, not a per-call token",
    "cache_folder": "models live in the proxy's configured caches (HF_HOME, runtime.cache_dir)",
}
# SHOW MODELS' word on a torch model that serves while an ONNX export runs (see Runtime._model).
_EXPORT_STATUS = {
    "running": "serving while the ONNX export runs",
    "switched": "ONNX export done: being replaced",
    "kept": "generation stays on torch in this process; ONNX export on disk for the next start",
    "failed": "no ONNX export: on torch",
}
_TRAIN_RUNTIME = "pgml.train: runtime {!r} is ignored: the proxy trains with the Python libraries"


class Runtime:
    """Implements `core.interfaces.Runtime` (and `models_info` for SHOW MODELS)."""

    def __init__(self, config: RuntimeConfig | Mapping[str, Any], upstream_dsn: str) -> None:
        self.config = config if isinstance(config, RuntimeConfig) else RuntimeConfig.from_mapping(config)
        self.upstream_dsn = upstream_dsn
        self.resolver = Resolver(self.config)
        self.executor = ThreadPoolExecutor(self.config.thread_count, thread_name_prefix="pgml-model")
        self.models = ModelCache(self.config, self.executor)
        # Background ONNX exports run in child processes (runtime/export_worker.py says why),
        # each waited for by a thread of its own: an export that takes minutes must not hold
        # one of the model pool's threads, which serve every batch.
        self._export_executor = ThreadPoolExecutor(1, thread_name_prefix="pgml-export")
        self._children = export_worker.ChildExports()
        self._exports: dict[str, _ExportJob] = {}  # by the ONNX model's cache key
        self._tabular: TabularRuntime | None = None
        self._tune: TuneRuntime | None = None
        # Per function: the call arguments that can carry an option accepted but not applied,
        # and the WARNING lines for a call (see _ignored).
        self._warnings: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any]], list[str]]]] = {
            "transform": (("task", "args", "cache"), self._transform_warnings),
            "transform_stream": (("task", "args", "cache"), self._transform_warnings),
            "embed": (("kwargs",), self._embed_warnings),
            "train": (("runtime",), self._train_warnings),
        }

    async def start(self) -> None:
        """Start the tabular side (its migrations) and warm the preload list."""
        optional.check()
        set_mmap_threshold(self.config.malloc_mmap_threshold_kb)  # before any model loads
        # No upstream (an LM-only runtime, as in unit tests and benchmarks): no tabular side.
        if self.upstream_dsn:
            # Imported here, not at the top: an LM-only runtime (the GPU check) runs without
            # psycopg and the tabular libraries. A failure to import is a failure to start.
            from runtime.tabular import TabularRuntime

            self._tabular = TabularRuntime(self.upstream_dsn, self.config.tabular,
                                           functools.partial(hub.downloads_off, self.config))
            await self._tabular.start()
            from runtime.tune import TuneRuntime  # fine-tuning shares the tabular registry

            self._tune = TuneRuntime(self._tabular.pool, self.config, self.resolver)
            self._tabular.deploy_listeners.append(self._tune.forget)
        for name in self.config.preload:
            await self.preload(name)

    async def preload(self, name: str) -> None:
        """Load `name` now: `embed:<model>`, `transform:<task>:<model>`, or a bare embed model.
        Its ONNX export is made now too (start-up waits for it), never in the background."""
        kind, _, rest = name.partition(":")
        if kind == "transform":
            task, _, model = rest.partition(":")
            spec = tf.parse_task(task if not model else {"task": task, "model": model}, {}, self.config)
            await self._pipeline(spec, ahead=True)
        elif kind == "rank":
            await self._rank_model(rest, {}, ahead=True)
        else:
            await self._embed_model(rest if kind == "embed" else name, {}, ahead=True)

    async def close(self) -> None:
        if self._tune is not None:
            await self._tune.close()
        if self._tabular is not None:
            await self._tabular.close()
        for job in self._exports.values():
            if job.task is not None:
                job.task.cancel()
        await self.models.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        # A running export's process is killed; its folder is renamed into place only when
        # complete, so a stop never leaves half an export where it is read.
        self._children.kill()
        self._export_executor.shutdown(wait=False, cancel_futures=True)

    def models_info(self) -> list[dict[str, Any]]:
        return self.models.info()

    async def count_tokens(self, kind: str, model: str, items: Sequence[Any]) -> list[int]:
        """Tokens of each item by `model`'s own tokenizer, off the event loop (the HTTP API's usage).

        kind "embed": texts as the embedding model reads them (special tokens, its truncation);
        "chat": conversations through the chat template with the assistant's opening; "prompt":
        text-generation prompts; "completion": generated text (no special tokens). Counting
        takes the model's lock: its fast tokenizer is not safe to share with a running batch.
        """
        if kind == "embed":
            entry = await self._embed_model(model, {})

            def count() -> list[int]:
                st = entry.obj.st
                # sentence-transformers 5.x renamed tokenize (now deprecated) to preprocess.
                prepare = getattr(st, "preprocess", None) or st.tokenize
                with entry.obj.lock:
                    mask = prepare(list(items))["attention_mask"]
                return [int(n) for n in np.asarray(mask).sum(axis=1)]
        else:
            spec = tf.parse_task({"task": "text-generation", "model": model}, {}, self.config)
            entry = await self._pipeline(await self._tuned(spec))

            def count() -> list[int]:
                tok = entry.obj.pipe.tokenizer
                with entry.obj.lock:
                    if kind == "chat":
                        return [len(tok.apply_chat_template(list(m), add_generation_prompt=True,
                                                            tokenize=True)) for m in items]
                    return [len(tok(t, add_special_tokens=kind == "prompt")["input_ids"]) for t in items]

        with _in_use(entry):
            return await asyncio.get_running_loop().run_in_executor(self.executor, count)

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        """Dispatch by the function's declaration (core.functions): `serve_<method>` of its runtime."""
        fn = functions.declaration(function)
        if fn is None:
            raise UndefinedFunction(f"function pgml.{function} is not provided by the runtime")
        for line in self._ignored(function, calls):
            await ctx.warning(line)
        if isinstance(fn.serve, NotSupported):
            raise FeatureNotSupported(f"pgml.{function} is not supported by pgml-proxy", hint=fn.serve.hint)
        if fn.serve.runtime == "tabular":
            if self._tabular is None:  # an LM-only runtime (no upstream): unit tests, benchmarks
                raise UndefinedFunction(f"function pgml.{function} is not provided by the runtime")
            return list(await self._tabular.call_batch(function, calls, ctx))
        if fn.serve.runtime == "tune":
            if self._tune is None:
                raise FeatureNotSupported(
                    f"pgml.{function} needs the registry upstream, which this runtime runs without"
                )
            return list(await self._tune.call_batch(function, calls, ctx))
        serve: Callable[..., Awaitable[list[Any]]] = getattr(self, f"serve_{fn.serve.method}")
        return await serve(function, calls, ctx)

    def call_now(self, function: str, calls: Sequence[Mapping[str, Any]]) -> list[Any] | None:
        """See core.interfaces.Runtime.call_now: a tabular predict on a loaded compiled model."""
        fn = functions.declaration(function)
        if (
            self._tabular is None
            or fn is None
            or not isinstance(fn.serve, Served)
            or fn.serve.runtime != "tabular"
            or self._ignored(function, calls)
        ):
            return None
        return self._tabular.call_now(function, calls)

    async def serve_transform_stream(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        # A caller that cannot stream gets every row at once (set-returning: 1-tuples).
        return list(await asyncio.gather(*(self._collect_stream(call, ctx) for call in calls)))

    async def serve_embed(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return await self._embed_calls(calls, ctx)

    async def serve_transform(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return await _each(self._transform, calls, ctx)

    async def serve_rank(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return await _each(self._rank, calls, ctx)

    async def serve_utility(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return [await asyncio.to_thread(utility.call, function, call) for call in calls]

    async def serve_chunk(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return await _each(self._chunk, calls, ctx)

    async def stream(self, function: str, call: Mapping[str, Any], ctx: CallContext) -> AsyncIterator[Any]:
        fn = functions.declaration(function)
        if fn is None or not fn.streams:
            raise UndefinedFunction(f"function pgml.{function} does not stream")
        spec = tf.parse_task(call.get("task"), call.get("args") or {}, self.config)
        tf.check_streamable(spec)
        for line in tf.ignored_options(spec, False):
            await ctx.warning(line)
        inputs = call.get("inputs")
        as_list = inputs is not None
        if inputs is None:
            inputs = [call.get("input", "")]
        entry = await self._pipeline(spec, ctx)
        with _in_use(entry):
            async for piece in tf.stream_generation(entry.obj, spec, list(inputs), as_list):
                yield piece

    def _ignored(self, function: str, calls: Sequence[Mapping[str, Any]]) -> list[str]:
        """The WARNING lines for a statement's calls, each once however many rows repeat it.
        Only the arguments that can carry such an option are read (a 100,000-row predict reads
        none)."""
        found = self._warnings.get(function)
        if found is None:
            return []
        fields, warn = found
        lines: dict[str, None] = {}
        seen: set[str] = set()
        for call in calls:
            given = [call.get(f) for f in fields]
            if not any(given):
                continue
            key = json.dumps(given, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                lines.update(dict.fromkeys(warn(call)))
        return list(lines)

    def _transform_warnings(self, call: Mapping[str, Any]) -> list[str]:
        try:
            spec = tf.parse_task(call.get("task"), call.get("args") or {}, self.config)
        except PgError:
            return []  # the call itself reports it
        return tf.ignored_options(spec, call.get("cache") is True)

    @staticmethod
    def _embed_warnings(call: Mapping[str, Any]) -> list[str]:
        kwargs = call.get("kwargs")
        if not isinstance(kwargs, Mapping):
            return []
        return [
            f'pgml.embed: kwarg "{k}" is ignored: {why}' for k, why in _EMBED_IGNORED.items() if k in kwargs
        ]

    @staticmethod
    def _train_warnings(call: Mapping[str, Any]) -> list[str]:
        return [_TRAIN_RUNTIME.format(call["runtime"])]

    async def _collect_stream(self, call: Mapping[str, Any], ctx: CallContext) -> list[tuple[Any]]:
        return [(piece,) async for piece in self.stream("transform_stream", call, ctx)]

    # --- embed / rank ---------------------------------------------------------------------------
    async def _model(
        self,
        kind: str,
        name: str,
        kwargs: Mapping[str, Any],
        build: _Build,
        ctx: CallContext | None,
        export: _Export | None = None,
        ahead: bool = False,
    ) -> Loaded:
        """The loaded model of `kind` (`embed`, `rank`, `transform:<task>`) for `name`: one
        load per resolved model, engine and device for every connection. Resolution (file
        walks, hashing, a download whose progress goes to the client) runs off the event loop.

        Under engine = "auto", a model placed on ONNX Runtime whose export is not on disk is
        served on torch while `export` runs in the background (unless `ahead`, or
        export_in_background is off: then this call exports and waits). engine = "onnx" asks
        for ONNX Runtime only, so it waits too."""
        trust = self._trust(kwargs)  # the rules apply before anything is looked up or fetched
        resolved = await self.resolver.aresolve(name, _revision(kwargs), _progress(ctx))
        placement = choose(self.config, dict(kwargs), onnx_capable=True)
        key = f"{kind}:{resolved.key}:{placement.engine}:{placement.device}"

        def load() -> Any:
            return build(resolved, placement, trust)

        if placement.engine != "onnx" or export is None or self.models.peek(key) is not None:
            return await self.models.get(key, name, load)
        job = self._exports.get(key)
        if job is None:
            background = self.config.export_in_background and self.config.engine == "auto"
            if ahead or not background or export.ready(resolved):
                return await self.models.get(key, name, load)
            torch_key = f"{kind}:{resolved.key}:torch:{placement.device}"
            job = self._exports[key] = _ExportJob(torch_key)
            log.info("%s: serving on torch while its ONNX export runs in the background", name)
        if job.state == "switched":  # evicted since, or not yet listed: the export is on disk
            return await self.models.get(key, name, load)
        on_torch = Placement("torch", placement.device)
        try:
            entry = await self.models.get(job.torch_key, name, lambda: build(resolved, on_torch, trust))
        except BaseException:
            if job.task is None:  # the next call tries again from the start
                self._exports.pop(key, None)
            raise
        if job.task is None:
            # Started once the torch model is loaded: the first call has the CPU to itself, and
            # a GGUF model's converted folder, which both need, is made once (by the load).
            job.task = asyncio.create_task(self._export(job, key, name, resolved, trust, load, export))
        entry.status = entry.status or _EXPORT_STATUS["running"]
        job.torch_calls += 1
        return entry

    async def _export(
        self,
        job: _ExportJob,
        key: str,
        name: str,
        resolved: ResolvedModel,
        trust: bool,
        load: Callable[[], Any],
        export: _Export,
    ) -> None:
        """Export in a child process, then (where the kind switches) load the ONNX model
        there too, list it, and unload the torch one once no call is running on it."""
        loop = asyncio.get_running_loop()
        try:
            exported = await loop.run_in_executor(
                self._export_executor, self._children.run, self.config, resolved, export.kind, trust
            )
            if exported and export.switch:
                await self.models.get(key, name, load, executor=self._export_executor)
        except Exception as exc:  # any failure leaves the model on torch, still served
            job.state = "failed"
            log.warning("%s: ONNX export failed, staying on torch: %s: %s", name, type(exc).__name__, exc)
        else:
            job.state = "switched" if exported and export.switch else "kept" if exported else "failed"
            log.info(
                "%s: ONNX export done after %.1f s (%d statements served on torch meanwhile); %s",
                name,
                time.monotonic() - job.started,
                job.torch_calls,
                "later calls run on ONNX Runtime" if job.state == "switched"
                else "generation stays on torch in this process; the next start loads the export"
                if exported else "no ONNX export for this model: it stays on torch",
            )
        torch_entry = self.models.peek(job.torch_key)
        if torch_entry is not None:
            torch_entry.status = _EXPORT_STATUS[job.state]
        if job.state != "switched":
            return
        while (torch_entry := self.models.peek(job.torch_key)) is not None and torch_entry.users:
            await asyncio.sleep(0.1)
        await self.models.unload(job.torch_key)

    async def _embed_model(
        self, name: str, kwargs: Mapping[str, Any], ctx: CallContext | None = None, ahead: bool = False
    ) -> Loaded:
        cfg = self.config
        export = _Export(
            ready=lambda r: export_ready(cfg, r, sentence_transformer_suffix(False)),
            kind="embed",
            switch=True,
        )
        return await self._model(
            "embed", name, kwargs, lambda r, p, trust: EmbedModel(cfg, r, p, trust), ctx, export, ahead
        )

    async def _embed_calls(self, calls: Sequence[Mapping[str, Any]], ctx: CallContext) -> list[Any]:
        """Every call of a statement at once. Calls naming the same model and kwargs (a
        statement's rows, usually) share one model lookup and one submit: per row, only the
        batcher's own work is left, which matters where the model is fast (a GPU)."""
        groups: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            key = json.dumps([call.get("transformer"), call.get("kwargs")], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:  # the usual case: no task per group
            return await self._embed_group(calls, ctx)
        out: list[Any] = [None] * len(calls)

        async def one_group(idx: list[int]) -> None:
            for i, result in zip(idx, await self._embed_group([calls[i] for i in idx], ctx), strict=True):
                out[i] = result

        await asyncio.gather(*(one_group(idx) for idx in groups.values()))
        return out

    async def _embed_group(self, calls: Sequence[Mapping[str, Any]], ctx: CallContext) -> list[Any]:
        """Calls with one transformer and kwargs: a vector per `text` call, 1-tuples per `inputs` call."""
        name = _text_arg(calls[0], "transformer", "embed")
        kwargs = _kwargs(calls[0], "embed")
        opts = embed_options(kwargs)
        texts: list[str] = []
        spans: list[tuple[int, int, bool]] = []  # (first text, count, set-returning form)
        for call in calls:
            many = "inputs" in call
            raw = list(call["inputs"]) if many else [call.get("text")]
            checked = [t for t in raw if isinstance(t, str)]
            if len(checked) != len(raw):
                raise InvalidParameterValue("pgml.embed: every input must be text")
            spans.append((len(texts), len(checked), many))
            texts.extend(checked)
        entry = await self._embed_model(name, {k: v for k, v in kwargs.items() if k in MODEL_KWARGS}, ctx)
        with _in_use(entry):
            vecs = await entry.batcher.submit(
                [(t, opts) for t in texts], [approx_tokens(t) for t in texts], ctx.stop
            )
        results: list[Any] = []
        for start, count, many in spans:
            lists = [v.tolist() for v in vecs[start : start + count]]
            results.append([(v,) for v in lists] if many else lists[0])
        return results

    async def _rank_model(
        self, name: str, kwargs: Mapping[str, Any], ctx: CallContext | None = None, ahead: bool = False
    ) -> Loaded:
        cfg = self.config
        export = _Export(
            ready=lambda r: export_ready(cfg, r, sentence_transformer_suffix(True)),
            kind="rank",
            switch=True,
        )
        return await self._model(
            "rank", name, kwargs, lambda r, p, trust: RankModel(cfg, r, p, trust), ctx, export, ahead
        )

    async def _rank(self, call: Mapping[str, Any], ctx: CallContext) -> list[tuple[int, float, str]]:
        name = _text_arg(call, "transformer", "rank")
        query = _text_arg(call, "query", "rank")
        documents = list(call.get("documents") or [])
        kwargs = _kwargs(call, "rank")
        top_k = kwargs.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InvalidParameterValue("pgml.rank: top_k must be a positive integer")
        unknown = sorted(set(kwargs) - MODEL_KWARGS - {"top_k", "return_documents", "batch_size"})
        if unknown:
            raise InvalidParameterValue(f'pgml.rank: unknown kwarg "{unknown[0]}"')
        if not documents:
            return []
        entry = await self._rank_model(name, kwargs, ctx)
        pairs = [(query, str(d)) for d in documents]
        with _in_use(entry):
            scores = await entry.batcher.submit(pairs, [approx_tokens(q + d) for q, d in pairs], ctx.stop)
        return rank_rows([str(d) for d in documents], scores, top_k)

    # --- transform ----------------------------------------------------------------------------------
    async def _pipeline(
        self, spec: tf.TaskSpec, ctx: CallContext | None = None, ahead: bool = False
    ) -> Loaded:
        cfg = self.config
        export = _Export(
            ready=lambda r: export_ready(cfg, r, pipeline_suffix(spec.base)),
            kind=spec.base,
            switch=spec.base not in tf.GENERATIVE,
        )
        return await self._model(
            f"transform:{spec.pipeline_task}",
            spec.model,
            spec.model_kwargs,
            lambda r, p, trust: tf.PipelineModel(cfg, r, spec, p, trust),
            ctx,
            export,
            ahead,
        )

    async def _transform(self, call: Mapping[str, Any], ctx: CallContext) -> Any:
        spec = await self._tuned(tf.parse_task(call.get("task"), call.get("args") or {}, self.config))
        inputs = tf.check_inputs(spec, list(call.get("inputs") or []))
        if not inputs:
            return []
        entry = await self._pipeline(spec, ctx)
        with _in_use(entry):
            outputs = await entry.batcher.submit(
                [(x, spec.args_key) for x in inputs], [tf.input_cost(x) for x in inputs], ctx.stop
            )
        return tf.shape_outputs(spec, outputs)

    async def _tuned(self, spec: tf.TaskSpec) -> tf.TaskSpec:
        """A model named after a tuned project is its deployed model's folder from pgml.files."""
        if self._tune is None:
            return spec
        found = await self._tune.tuned_folder(spec.model)
        return spec if found is None else dataclasses.replace(spec, model=str(found[0]))

    # --- chunk ---------------------------------------------------------------------------------------
    async def _chunk(self, call: Mapping[str, Any], _ctx: CallContext) -> list[tuple[int, str]]:
        splitter = _text_arg(call, "splitter", "chunk")
        text = call.get("text")
        if not isinstance(text, str):
            raise InvalidParameterValue("pgml.chunk: text must be text")
        kwargs = _kwargs(call, "chunk")
        loop = asyncio.get_running_loop()
        pieces = await loop.run_in_executor(self.executor, chunking.split, splitter, text, kwargs)
        return [(i, piece) for i, piece in enumerate(pieces, start=1)]

    def _trust(self, kwargs: Mapping[str, Any]) -> bool:
        asked = bool(kwargs.get("trust_remote_code", False))
        if asked and not self.config.trust_remote_code:
            raise InsufficientPrivilege(
                "trust_remote_code is disabled", hint="set runtime.trust_remote_code = true to allow it"
            )
        return asked


async def _each(
    handler: Callable[[Mapping[str, Any], CallContext], Awaitable[Any]],
    calls: Sequence[Mapping[str, Any]],
    ctx: CallContext,
) -> list[Any]:
    if len(calls) == 1:
        return [await handler(calls[0], ctx)]
    # Every call is submitted at once so the batcher sees them together.
    return list(await asyncio.gather(*(handler(call, ctx) for call in calls)))


def _progress(ctx: CallContext | None) -> Progress:
    """A download's progress lines: to the log, and to the client as INFO notices."""
    loop = asyncio.get_running_loop()

    async def send(message: str) -> None:
        if ctx is not None:
            # The asking client may be gone while others wait for the same download.
            with contextlib.suppress(Exception):
                await ctx.notice(message)

    def say(message: str) -> None:  # called from the resolving thread
        log.info("%s", message)
        asyncio.run_coroutine_threadsafe(send(message), loop)

    return say


@contextlib.contextmanager
def _in_use(entry: Loaded) -> Any:
    entry.users += 1
    try:
        yield
    finally:
        entry.users -= 1


def _revision(kwargs: Mapping[str, Any]) -> str | None:
    revision = kwargs.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise InvalidParameterValue("revision must be a text value (a branch, tag or commit)")
    return revision


def _text_arg(call: Mapping[str, Any], key: str, function: str) -> str:
    value = call.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidParameterValue(f"pgml.{function}: {key} must be a non-empty text value")
    return value


def _kwargs(call: Mapping[str, Any], function: str) -> dict[str, Any]:
    kwargs = call.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise InvalidParameterValue(f"pgml.{function}: kwargs must be a JSON object")
    return dict(kwargs)
