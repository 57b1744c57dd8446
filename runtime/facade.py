"""`runtime.Runtime`: the planner's one entry point for every pgml function.

Owns dispatch by function name, argument validation into SQLSTATE errors, model lookup
through the registry (one load per model for every connection) and the thread pool that
all model work runs in. Language-model functions live in this package; tabular ones are
handed to `runtime.tabular.TabularRuntime`, imported lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.errors import FeatureNotSupported, InvalidParameterValue, UndefinedFunction
from core.interfaces import CallContext
from runtime import chunk as chunking
from runtime import transform as tf
from runtime.config import RuntimeConfig
from runtime.embed import MODEL_KWARGS, EmbedModel, RankModel, approx_tokens, embed_options, rank_rows
from runtime.engines import choose
from runtime.registry import Loaded, Registry
from runtime.resolve import Resolver

_LM_FUNCTIONS = frozenset({"embed", "transform", "transform_stream", "rank", "chunk"})
# Functions of the extension that the proxy does not run (yet), with what to do instead.
_NOT_SUPPORTED = {
    "tune": "fine-tuning (pgml.tune) is not implemented: fine-tune with transformers outside the proxy, "
    "then serve the model with pgml.transform by naming its folder in [runtime.aliases]",
    "generate": "pgml.generate serves models made by pgml.tune, which is not implemented; "
    "use pgml.transform('text-generation', ...) or chat with inputs jsonb[]",
}


class Runtime:
    """Implements `core.interfaces.Runtime` (and `models_info` for SHOW MODELS)."""

    def __init__(self, config: RuntimeConfig | Mapping[str, Any], upstream_dsn: str) -> None:
        self.config = config if isinstance(config, RuntimeConfig) else RuntimeConfig.from_mapping(config)
        self.upstream_dsn = upstream_dsn
        self.resolver = Resolver(self.config)
        self.executor = ThreadPoolExecutor(self.config.thread_count, thread_name_prefix="pgml-model")
        self.registry = Registry(self.config, self.executor)
        self._tabular: Any = None

    async def start(self) -> None:
        """Start the tabular side (its migrations) and warm the preload list."""
        # No upstream (an LM-only runtime, as in unit tests and benchmarks): no tabular side.
        if self.upstream_dsn:
            self._tabular = _load_tabular(self.upstream_dsn, self.config.tabular)
        if self._tabular is not None:
            await self._tabular.start()
        for name in self.config.preload:
            await self.preload(name)

    async def preload(self, name: str) -> None:
        """Load `name` now: `embed:<model>`, `transform:<task>:<model>`, or a bare embed model."""
        kind, _, rest = name.partition(":")
        if kind == "transform":
            task, _, model = rest.partition(":")
            spec = tf.parse_task(task if not model else {"task": task, "model": model}, {}, self.config)
            await self._pipeline(spec)
        elif kind == "rank":
            await self._rank_model(rest, {})
        else:
            await self._embed_model(rest if kind == "embed" else name, {})

    async def close(self) -> None:
        if self._tabular is not None:
            await self._tabular.close()
        await self.registry.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def models_info(self) -> list[dict[str, Any]]:
        return self.registry.info()

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        if function not in _LM_FUNCTIONS:
            if self._tabular is not None and function in self._tabular.functions:
                return list(await self._tabular.call_batch(function, calls, ctx))
            if function in _NOT_SUPPORTED:
                raise FeatureNotSupported(
                    f"pgml.{function} is not supported by pgml-proxy", hint=_NOT_SUPPORTED[function]
                )
            raise UndefinedFunction(f"function pgml.{function} is not provided by the runtime")
        if function == "transform_stream":
            # A caller that cannot stream gets every row at once (set-returning: 1-tuples).
            return list(await asyncio.gather(*(self._collect_stream(call, ctx) for call in calls)))
        if function == "embed":
            return await self._embed_calls(calls, ctx)
        handler = {
            "transform": self._transform,
            "rank": self._rank,
            "chunk": self._chunk,
        }[function]
        if len(calls) == 1:
            return [await handler(calls[0], ctx)]
        # Every call is submitted at once so the batcher sees them together.
        return list(await asyncio.gather(*(handler(call, ctx) for call in calls)))

    async def stream(self, function: str, call: Mapping[str, Any], ctx: CallContext) -> AsyncIterator[Any]:
        if function != "transform_stream":
            raise UndefinedFunction(f"function pgml.{function} does not stream")
        spec = tf.parse_task(call.get("task"), call.get("args") or {}, self.config)
        tf.check_streamable(spec)
        inputs = call.get("inputs")
        as_list = inputs is not None
        if inputs is None:
            inputs = [call.get("input", "")]
        entry = await self._pipeline(spec)
        with _in_use(entry):
            async for piece in tf.stream_generation(entry.obj, spec, list(inputs), as_list):
                yield piece

    async def _collect_stream(self, call: Mapping[str, Any], ctx: CallContext) -> list[tuple[Any]]:
        return [(piece,) async for piece in self.stream("transform_stream", call, ctx)]

    # --- embed / rank ---------------------------------------------------------------------------
    async def _embed_model(self, name: str, kwargs: Mapping[str, Any]) -> Loaded:
        resolved = self.resolver.resolve(name, _revision(kwargs))
        trust = self._trust(kwargs)
        placement = choose(self.config, dict(kwargs), onnx_capable=True)
        key = f"embed:{resolved.key}:{placement.engine}:{placement.device}"
        return await self.registry.get(key, name, lambda: EmbedModel(self.config, resolved, placement, trust))

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
        entry = await self._embed_model(name, {k: v for k, v in kwargs.items() if k in MODEL_KWARGS})
        with _in_use(entry):
            vecs = await entry.batcher.submit(
                [(t, opts) for t in texts], [approx_tokens(t) for t in texts], ctx.stop
            )
        results: list[Any] = []
        for start, count, many in spans:
            lists = [v.tolist() for v in vecs[start : start + count]]
            results.append([(v,) for v in lists] if many else lists[0])
        return results

    async def _rank_model(self, name: str, kwargs: Mapping[str, Any]) -> Loaded:
        resolved = self.resolver.resolve(name, _revision(kwargs))
        trust = self._trust(kwargs)
        placement = choose(self.config, dict(kwargs), onnx_capable=True)
        key = f"rank:{resolved.key}:{placement.engine}:{placement.device}"
        return await self.registry.get(key, name, lambda: RankModel(self.config, resolved, placement, trust))

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
        entry = await self._rank_model(name, kwargs)
        pairs = [(query, str(d)) for d in documents]
        with _in_use(entry):
            scores = await entry.batcher.submit(pairs, [approx_tokens(q + d) for q, d in pairs], ctx.stop)
        return rank_rows([str(d) for d in documents], scores, top_k)

    # --- transform ----------------------------------------------------------------------------------
    async def _pipeline(self, spec: tf.TaskSpec) -> Loaded:
        resolved = self.resolver.resolve(spec.model, _revision(spec.model_kwargs))
        trust = self._trust(spec.model_kwargs)
        placement = choose(self.config, dict(spec.model_kwargs), onnx_capable=True)
        key = f"transform:{spec.pipeline_task}:{resolved.key}:{placement.engine}:{placement.device}"
        return await self.registry.get(
            key,
            spec.model,
            lambda: tf.PipelineModel(self.config, resolved, spec, placement, trust),
        )

    async def _transform(self, call: Mapping[str, Any], ctx: CallContext) -> Any:
        spec = tf.parse_task(call.get("task"), call.get("args") or {}, self.config)
        inputs = tf.check_inputs(spec, list(call.get("inputs") or []))
        if not inputs:
            return []
        entry = await self._pipeline(spec)
        with _in_use(entry):
            outputs = await entry.batcher.submit(
                [(x, spec.args_key) for x in inputs], [tf.input_cost(x) for x in inputs], ctx.stop
            )
        return tf.shape_outputs(spec, outputs)

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
            from core.errors import InsufficientPrivilege

            raise InsufficientPrivilege(
                "trust_remote_code is disabled", hint="set runtime.trust_remote_code = true to allow it"
            )
        return asked


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


def _load_tabular(dsn: str, settings: Mapping[str, Any]) -> Any:
    """The tabular runtime when its package is present; None otherwise (names stay undefined)."""
    try:
        module = importlib.import_module("runtime.tabular")
    except ImportError:
        return None
    klass = getattr(module, "TabularRuntime", None)
    return None if klass is None else klass(dsn, settings)
