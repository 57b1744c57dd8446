"""`TabularRuntime`: the tabular pgml functions behind `runtime.Runtime`'s dispatch.

Owns the lifecycle (migrations at start, the LISTEN task for deploys from other
instances, the worker threads, the fit processes), and routes each function name to the
trainer, the predictor, deploy or load_dataset. Its own upstream connections only: training reads
committed data, never the client's open transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from core.errors import ConfigError, InvalidParameterValue, UndefinedFunction, lookup
from core.functions import Served, declaration, served_by
from core.interfaces import CallContext, ColumnCalls
from core.settings import RuntimeConfig, TabularSettings
from runtime import hub

from . import datasets, deploy, fitproc, migrations, offline_datasets, registry, trainer
from .predictor import Predictor

log = logging.getLogger(__name__)
_Calls = Sequence[Mapping[str, Any]]

def _substitutes(settings: TabularSettings) -> dict[str, str]:
    """`dataset_substitutes`: hub dataset name -> an offline generator of the same role."""
    for name, generator in settings.dataset_substitutes.items():
        if generator not in offline_datasets.GENERATORS:
            raise ConfigError(
                f"runtime.tabular.dataset_substitutes.{name}",
                f"unknown generator {generator!r}; expected one of {sorted(offline_datasets.GENERATORS)}",
            )
    return dict(settings.dataset_substitutes)


_BACKOFF = (0.1, 5.0)  # the LISTEN task's first and longest wait between reconnections
_OBJECT_ARGS = ("hyperparams", "search_params", "search_args", "kwargs")
_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array"}


def _check_objects(function: str, call: Mapping[str, Any]) -> None:
    """22023 naming the argument when a JSON argument that must be an object is another JSON type."""
    for name in _OBJECT_ARGS:
        value = call.get(name)
        if value is not None and not isinstance(value, Mapping):
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            raise InvalidParameterValue(
                f"pgml.{function}: {name} must be a JSON object, not a JSON {kind}",
                hint=f"""for example {name} => '{{"n_estimators": 10}}'""",
            )


class TabularRuntime:
    """Training, prediction and the registry of tabular models in the upstream's `pgml` schema."""

    functions = served_by("tabular")

    def __init__(self, upstream_dsn: str, settings: TabularSettings | Mapping[str, Any],
                 downloads_off: Callable[[], str | None] | None = None) -> None:
        self._dsn = upstream_dsn
        # Whether hub datasets may be downloaded: the runtime's switch for models (`hub.downloads_off`).
        self._downloads_off = downloads_off or (lambda: hub.downloads_off(RuntimeConfig()))
        cfg = settings if isinstance(settings, TabularSettings) else TabularSettings.from_mapping(settings)
        self._substitutes = _substitutes(cfg)
        self._pool = registry.new_pool(upstream_dsn, cfg.pool_size)
        self._executor = ThreadPoolExecutor(cfg.predict_threads, thread_name_prefix="pgml-predict")
        self._predictor = Predictor(
            self._pool, self._executor, cfg.max_batch_rows, cfg.max_queue, cfg.max_models, cfg.onnx,
            cfg.inline_budget_us / 1e6,
        )
        self._onnx = cfg.onnx
        self._fits = fitproc.FitWorkers(cfg.idle_fit_processes)
        self._listener: asyncio.Task[None] | None = None
        # Others caching per-project deployments (runtime.tune): told what this listener hears.
        self.deploy_listeners: list[Callable[[str | None], None]] = []
        self._listening = asyncio.Event()

    async def start(self) -> None:
        """Migrate the `pgml` schema (one proxy at a time) and start listening for deploys."""
        await self._pool.open(wait=True, timeout=30)
        async with self._pool.connection() as conn:
            applied = await migrations.migrate(conn)
        if applied:
            log.info("pgml schema migrations applied: %s", applied)
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        await asyncio.wait_for(self._listening.wait(), 30)

    async def _listen(self) -> None:
        """Drop cached deployments announced by any instance; reconnect, with backoff, after a loss.

        The connection is the pool's (checked, reconnected by psycopg_pool): after an upstream
        restart the next attempt gets a fresh one, and no statement waits for this task.
        """
        delay = _BACKOFF[0]
        while True:
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(f"LISTEN {registry.DEPLOY_CHANNEL}")
                    # Anything announced while we were not listening is unknown: start afresh.
                    self._forget(None)
                    self._listening.set()
                    delay = _BACKOFF[0]
                    try:
                        async for note in conn.notifies():
                            self._forget(note.payload)
                    finally:
                        if not conn.closed:  # the connection goes back to the pool: stop listening
                            with contextlib.suppress(psycopg.Error):
                                await conn.execute("UNLISTEN *")
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("LISTEN %s lost (%s); retrying in %.1f s", registry.DEPLOY_CHANNEL, exc, delay)
                self._forget(None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF[1])

    def _forget(self, project: str | None) -> None:
        self._predictor.forget_deployment(project)
        for listener in self.deploy_listeners:
            listener(project)

    @property
    def pool(self) -> registry.Pool:
        """The runtime's one pool of upstream connections (fine-tuning shares it)."""
        return self._pool

    def batch_stats(self) -> dict[str, dict[str, int]]:
        """Library calls and rows per `model_id/op` since start: how well predicts batch."""
        return self._predictor.stats()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._predictor.close()
        await self._fits.close()
        await self._pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        """One result per call (see core.interfaces.Runtime.call_batch), by `serve_<method>`."""
        fn = declaration(function)
        if fn is None or not isinstance(fn.serve, Served) or fn.serve.runtime != "tabular":
            raise UndefinedFunction(f"pgml.{function} is not a tabular function")
        serve: Callable[..., Awaitable[list[Any]]] = getattr(self, f"serve_{fn.serve.method}")
        if fn.serve.method != "predict":
            for call in calls:
                _check_objects(function, call)
        try:
            return await serve(function, calls, ctx)
        except psycopg.Error as exc:
            # An upstream error on our own connections (permissions, a lost connection):
            # the client gets its SQLSTATE and message rather than an internal error.
            code = exc.sqlstate or "58000"
            raise lookup(code)(f"pgml.{function}: {exc}".strip(), fields={"C": code}) from exc

    async def serve_predict(self, function: str, calls: _Calls, ctx: CallContext) -> list[Any]:
        if isinstance(calls, ColumnCalls) and "features" in calls.columns:
            got = await self._predictor.run_matrix(
                function, _predict_keys(calls.fixed), calls.columns["features"], ctx.stop
            )
            if got is not None:
                return got
        return await self._predictor.run(function, [_predict_keys(c) for c in calls], ctx.stop)

    def call_now(self, function: str, calls: _Calls) -> list[Any] | None:
        """`call_batch`'s results when a predict can be answered without waiting
        (Predictor.run_now); None when it must go through `call_batch`."""
        fn = declaration(function)
        if fn is None or not isinstance(fn.serve, Served) or fn.serve.method != "predict":
            return None
        return self._predictor.run_now(function, [_predict_keys(c) for c in calls])

    # Training and registry changes run one call at a time, in order.
    async def serve_train(self, function: str, calls: _Calls, ctx: CallContext) -> list[Any]:
        out = []
        for call in calls:
            # Refused before any training work; checked again where the model is written.
            await self._check_may_write(str(call["project_name"]), ctx.user)
            row = await trainer.train(
                self._pool, self._fits, call, ctx, joint=function == "train_joint", onnx=self._onnx
            )
            self._forget(str(call["project_name"]))
            out.append([row])
        return out

    async def serve_snapshot(self, function: str, calls: _Calls, ctx: CallContext) -> list[Any]:
        return [[await trainer.snapshot(self._pool, call, ctx)] for call in calls]

    async def serve_deploy(self, function: str, calls: _Calls, ctx: CallContext) -> list[Any]:
        out = []
        for call in calls:
            row = await deploy.deploy(self._pool, call, ctx.user)
            self._forget(row[0])
            out.append([row])
        return out

    async def serve_load_dataset(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return [[await self._load_dataset(call, ctx)] for call in calls]

    async def _check_may_write(self, project: str, user: str) -> None:
        async with self._pool.connection() as conn:
            found = await registry.project(conn, project)
            if found is not None:
                await registry.check_may_write(conn, int(found["id"]), user, "train into")

    async def _load_dataset(self, call: Mapping[str, Any], ctx: CallContext) -> tuple[Any, ...]:
        source = str(call.get("source") or "")
        if not source:
            raise InvalidParameterValue("load_dataset needs a source name")
        limit = call.get("limit")
        generator = self._substitutes.get(source)
        if generator is not None:
            await ctx.notice(
                f"dataset {source!r} is served by the offline substitute {generator!r}"
                " (runtime.tabular.dataset_substitutes), not by the Hugging Face hub"
            )
        ds = await asyncio.to_thread(
            datasets.build,
            source,
            call.get("subset"),
            None if limit is None else int(limit),
            dict(call.get("kwargs") or {}),
            None if generator is None else offline_datasets.GENERATORS[generator],
            self._downloads_off(),
            _notices(ctx),
        )
        async with self._pool.connection() as conn:
            return await datasets.store(conn, ds, ctx.user)


def _notices(ctx: CallContext) -> Callable[[str], None]:
    """What a dataset load reports, from its thread: to the log, and to the client as INFO notices."""
    loop = asyncio.get_running_loop()

    async def send(message: str) -> None:
        with contextlib.suppress(Exception):  # the client may be gone; the load goes on
            await ctx.notice(message)

    def say(message: str) -> None:
        log.info("%s", message)
        asyncio.run_coroutine_threadsafe(send(message), loop)

    return say


def _predict_keys(call: Mapping[str, Any]) -> Mapping[str, Any]:
    """The SQL arguments as the predictor takes them: an integer `project_name` is a
    `model_id`, a row (`t.*`, ROW(...)) given as `features` is a `row`."""
    if "project_name" not in call and "features" not in call:
        return call
    project, features = call.get("project_name"), call.get("features")
    # (A list first: the ABC test costs a microsecond, and a one-row predict does little more.)
    if isinstance(project, str) and (type(features) is list or not isinstance(features, Mapping)):
        return call  # the common case, as given: no copy per row of a 100,000-row predict
    out = dict(call)
    project = out.get("project_name")
    if isinstance(project, int) and not isinstance(project, bool):
        out["model_id"] = out.pop("project_name")
    if isinstance(out.get("features"), Mapping):
        out["row"] = out.pop("features")
    return out
