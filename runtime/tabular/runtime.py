"""`TabularRuntime`: the tabular pgml functions behind `runtime.Runtime`'s dispatch.

Owns the lifecycle (migrations at start, the LISTEN task for deploys from other
instances, the worker threads), and routes each function name to the trainer, the
predictor, deploy or load_dataset. Its own upstream connections only: training reads
committed data, never the client's open transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from core.errors import ConfigError, InvalidParameterValue, UndefinedFunction, lookup
from core.interfaces import CallContext

from . import datasets, deploy, migrations, offline_datasets, registry, trainer
from .predictor import OPS, Predictor

log = logging.getLogger(__name__)

_SETTINGS = {
    "pool_size": 4,
    "predict_threads": 2,
    "max_batch_rows": 4096,
    "max_queue": 10000,
    "max_models": 32,
}


def _substitutes(raw: Mapping[str, Any]) -> dict[str, str]:
    """`dataset_substitutes`: hub dataset name -> an offline generator of the same role."""
    subs = raw.get("dataset_substitutes", {})
    if not isinstance(subs, Mapping):
        raise ConfigError("runtime.tabular.dataset_substitutes", "expected a table of name = generator")
    for name, generator in subs.items():
        if generator not in offline_datasets.GENERATORS:
            raise ConfigError(
                f"runtime.tabular.dataset_substitutes.{name}",
                f"unknown generator {generator!r}; expected one of {sorted(offline_datasets.GENERATORS)}",
            )
    return {str(k): str(v) for k, v in subs.items()}


def _settings(raw: Mapping[str, Any]) -> dict[str, int]:
    out = dict(_SETTINGS)
    for key, value in raw.items():
        if key not in _SETTINGS:
            continue  # other runtime keys belong to the language-model side or _substitutes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"runtime.{key}", f"must be a positive integer, got {value!r}")
        out[key] = value
    return out


class TabularRuntime:
    """Training, prediction and the registry of tabular models in the upstream's `pgml` schema."""

    functions = frozenset(
        {
            "train",
            "train_joint",
            "snapshot",
            "predict",
            "predict_proba",
            "predict_joint",
            "predict_batch",
            "decompose",
            "deploy",
            "load_dataset",
        }
    )

    def __init__(self, upstream_dsn: str, settings: Mapping[str, Any]) -> None:
        self._dsn = upstream_dsn
        cfg = _settings(settings)
        self._substitutes = _substitutes(settings)
        self._pool = registry.Pool(upstream_dsn, cfg["pool_size"])
        self._executor = ThreadPoolExecutor(cfg["predict_threads"], thread_name_prefix="pgml-predict")
        self._predictor = Predictor(
            self._pool, self._executor, cfg["max_batch_rows"], cfg["max_queue"], cfg["max_models"]
        )
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        """Migrate the `pgml` schema (one proxy at a time) and start listening for deploys."""
        async with self._pool.connection() as conn:
            applied = await migrations.migrate(conn)
        if applied:
            log.info("pgml schema migrations applied: %s", applied)
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        await asyncio.wait_for(self._listening.wait(), 30)

    async def _listen(self) -> None:
        """Drop cached deployments announced by any instance; reconnect after a failure."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {registry.DEPLOY_CHANNEL}")
                    # Anything announced while we were not listening is unknown: start afresh.
                    self._predictor.forget_deployment()
                    self._listening.set()
                    async for note in conn.notifies():
                        self._predictor.forget_deployment(note.payload)
            except psycopg.Error as exc:
                log.warning("LISTEN %s failed (%s); retrying", registry.DEPLOY_CHANNEL, exc)
                self._predictor.forget_deployment()
                await asyncio.sleep(1)

    def batch_stats(self) -> dict[str, dict[str, int]]:
        """Library calls and rows per `model_id/op` since start: how well predicts batch."""
        return self._predictor.stats()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._predictor.close()
        await self._pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        """One result per call (see core.interfaces.Runtime.call_batch)."""
        if function not in self.functions:
            raise UndefinedFunction(f"pgml.{function} is not a tabular function")
        try:
            if function in OPS:
                return await self._predictor.run(function, calls, ctx.stop)
            # Training and registry changes run one call at a time, in order.
            return [await self._one(function, call, ctx) for call in calls]
        except psycopg.Error as exc:
            # An upstream error on our own connections (permissions, a lost connection):
            # the client gets its SQLSTATE and message rather than an internal error.
            code = exc.sqlstate or "58000"
            raise lookup(code)(f"pgml.{function}: {exc}".strip(), fields={"C": code}) from exc

    async def _one(self, function: str, call: Mapping[str, Any], ctx: CallContext) -> list[tuple[Any, ...]]:
        if function in ("train", "train_joint"):
            row = await trainer.train(self._pool, call, ctx, joint=function == "train_joint")
            self._predictor.forget_deployment(str(call["project_name"]))
            return [row]
        if function == "snapshot":
            return [await trainer.snapshot(self._pool, call, ctx)]
        if function == "deploy":
            row = await deploy.deploy(self._pool, call)
            self._predictor.forget_deployment(row[0])
            return [row]
        return [await self._load_dataset(call, ctx)]

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
        )
        async with self._pool.connection() as conn:
            return await datasets.store(conn, ds, ctx.user)
