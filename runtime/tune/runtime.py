"""`TuneRuntime`: `pgml.tune`, `pgml.generate`, and tuned projects as models for `pgml.transform`.

Owns the flow of one tuning (check, read, register in progress, train in a worker
process while relaying its logs as INFO notices and `pgml.logs` rows, store, deploy)
and the way back from a project name (or a hub name `[runtime.aliases]` maps to one)
to a local model folder: the deployed tuned model's files are read from `pgml.files`
once per model id into `<cache_dir>/tuned/model-<id>`, which any proxy (or the same
one after a restart) rebuilds from the database alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import InvalidParameterValue, UndefinedFunction, lookup
from core.functions import Served, declaration, served_by
from core.interfaces import CallContext
from runtime import processes
from runtime.config import RuntimeConfig
from runtime.resolve import Resolver
from runtime.tabular import registry

from . import args as tune_args
from . import data, store

log = logging.getLogger(__name__)


class TuneRuntime:
    """The fine-tuning side of the runtime, on its own upstream connections."""

    functions = served_by("tune")

    def __init__(self, pool: registry.Pool, config: RuntimeConfig, resolver: Resolver) -> None:
        # The tabular runtime's pool (one way to the upstream for the runtime's own work); it
        # opens and closes it.
        self._pool = pool
        self._config = config
        self._resolver = resolver
        # project name -> (folder, task) of its deployed tuned model, or None: not a tuned project.
        self._deployed: dict[str, tuple[Path, str] | None] = {}
        self._generators: dict[str, Any] = {}

    async def close(self) -> None:
        """Nothing of its own to release: the pool is the tabular runtime's."""

    def forget(self, project: str | None = None) -> None:
        """A deployment changed (NOTIFY pgml_deploy): look the project (or every one) up again."""
        if project is None:
            self._deployed.clear()
        else:
            for name in [n for n in self._deployed if project in self._alias_chain(n)]:
                self._deployed.pop(name)

    def _alias_chain(self, name: str) -> list[str]:
        """`name` and what `[runtime.aliases]` leads it to: a hub name may alias a tuned project
        (the README serves and re-tunes `santiadavani/imdb_review_sentiement`, its pushed copy)."""
        chain = [name]
        for _ in range(8):  # bounded as the resolver's chains are, so a cycle cannot hang
            target = self._resolver.aliases.get(chain[-1])
            if target is None or target in chain:
                break
            chain.append(target)
        return chain

    async def _deployed_tuned(self, name: str) -> tuple[int, str] | None:
        """(model id, task) of the deployed tuned model of `name`, or of the project it is an alias of."""
        for candidate in self._alias_chain(name):
            found = await store.deployed_tuned(self._pool, candidate)
            if found is not None:
                return found
        return None

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        """Dispatch by the declaration (core.functions): `serve_<method>`."""
        fn = declaration(function)
        if fn is None or not isinstance(fn.serve, Served) or fn.serve.runtime != "tune":
            raise UndefinedFunction(f"pgml.{function} is not a fine-tuning function")
        serve: Callable[..., Awaitable[list[Any]]] = getattr(self, f"serve_{fn.serve.method}")
        return await serve(function, calls, ctx)

    async def serve_tune(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        return [[await self.tune(call, ctx)] for call in calls]  # one training at a time, in order

    async def serve_generate(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        from . import chat

        return [await chat.generate(self, call) for call in calls]

    # --- serving ----------------------------------------------------------------------------
    async def tuned_folder(self, name: str, tasks: Sequence[str] = ()) -> tuple[Path, str] | None:
        """(local folder, task) of project `name`'s deployed tuned model; None when `name` is not one."""
        if name not in self._deployed:
            found = await self._deployed_tuned(name)
            # Cached until a deploy is announced: a transform call costs no query after the first.
            self._deployed[name] = None if found is None else (await self.model_folder(found[0]), found[1])
        cached = self._deployed[name]
        if cached is None or (tasks and cached[1] not in tasks):
            return None
        return cached

    async def model_folder(self, model_id: int) -> Path:
        """Model `model_id`'s files as a local folder, written once (beside, then renamed)."""
        # Model ids repeat across databases and clusters: the folder is named by what is unique.
        target = (
            self._config.cache_path
            / "tuned"
            / f"model-{model_id}-{await store.model_stamp(self._pool, model_id)}"
        )
        if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
            return target
        # Written beside, then renamed: a crash (or another proxy on this disk) never leaves
        # half a folder where it is loaded from.
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}-{id(asyncio.current_task())}")
        shutil.rmtree(tmp, ignore_errors=True)
        await store.write_folder(self._pool, model_id, tmp)
        if (tmp / "adapter_config.json").is_file():
            tmp = await self._merged(model_id, tmp)
        try:
            tmp.rename(target)
        except OSError:  # someone else finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    async def _merged(self, model_id: int, adapter: Path) -> Path:
        """A LoRA adapter merged into its base: a plain folder every loader reads."""
        from . import chat

        base = chat.base_of(adapter)
        if not base or not Path(base).is_dir():  # trained on another machine: resolve the name again
            base = await self._base(await store.base_name(self._pool, model_id))
        merged = adapter.with_name(adapter.name + "-merged")
        shutil.rmtree(merged, ignore_errors=True)
        await asyncio.to_thread(chat.merge_adapter, adapter, base, merged)
        shutil.rmtree(adapter, ignore_errors=True)
        return merged

    async def generator(self, folder: Path) -> Any:
        """The chat model in `folder`, loaded once per folder (a folder is one model id)."""
        from . import chat

        key = str(folder)
        if key not in self._generators:
            self._generators[key] = await asyncio.to_thread(chat.Generator, folder)
        return self._generators[key]

    async def _base(self, name: str) -> str:
        """The folder to start from: a previous tuned project's (or model id's) weights, or a base model."""
        found = await self._deployed_tuned(name)
        if found is not None:
            return str(await self.model_folder(found[0]))
        if name.isdigit():
            return str(await self.model_folder(int(name)))
        resolved = self._resolver.resolve(name)
        if resolved.gguf_file is None:
            return str(resolved.path)
        from runtime.gguf import ensure_transformers_folder

        return str(await asyncio.to_thread(ensure_transformers_folder, self._config, resolved))

    # --- tuning -----------------------------------------------------------------------------
    async def tune(self, call: Mapping[str, Any], ctx: CallContext) -> tuple[Any, ...]:
        """One `pgml.tune` call; returns (project, task, algorithm, deployed) as the extension does."""
        await asyncio.to_thread(tune_args.training_arg_names)  # imports transformers off the loop
        args = tune_args.parse(call)
        async with self._pool.connection() as conn:
            proj = await registry.project(conn, args.project)
        if proj is not None and proj["task"] != args.task:
            raise InvalidParameterValue(
                f"pgml.tune: project {args.project!r} has task {proj['task']!r}, not {args.task!r}"
            )
        base = await self._base(args.model_name)
        split = await data.read(self._pool, args, ctx.user)
        project_id, model_id = await store.begin(self._pool, args, split)
        self.forget(args.project)
        # Its own folder: model ids repeat across databases that proxies sharing this disk serve.
        (self._config.cache_path / "tune").mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"job-{model_id}-", dir=self._config.cache_path / "tune"))
        try:
            metrics = await self._train(args, split, base, folder, project_id, model_id, ctx)
            files = await asyncio.to_thread(store.model_files, folder / "model")
            deployed = await store.complete(self._pool, args, project_id, model_id, metrics, files)
        except BaseException:
            # Cancelled (cancel, timeout, disconnect) or failed: the row says so; no file, no deployment.
            status = "cancelled" if _cancelled() else "failed"
            await asyncio.shield(store.finish(self._pool, model_id, status))
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            self.forget(args.project)
        return (args.project, args.task, tune_args.ALGORITHM, deployed)

    async def _train(
        self,
        args: tune_args.TuneArgs,
        split: data.Split,
        base: str,
        folder: Path,
        project_id: int,
        model_id: int,
        ctx: CallContext,
    ) -> dict[str, Any]:
        """Run the worker process to its end; relay its lines; returns the model's metrics."""
        job = {
            "task": args.task,
            "base": base,
            "project_name": args.project,
            "labels": split.labels,
            "train": split.train,
            "test": split.test,
            "training_args": args.training_args,
            "lora_config": args.hyperparams.get("lora_config"),
            "max_seq_length": args.hyperparams.get("max_seq_length"),
            "merge_weights": bool(args.hyperparams.get("merge_weights", False)),
            "push_to_hub": args.push_to_hub,
            "hub_private_repo": args.hub_private_repo,
        }
        (folder / "job.json").write_text(json.dumps(job))
        # The secret reaches the process, never a table.
        env = {"PGML_TUNE_HUB_TOKEN": args.token} if args.token else {}
        await ctx.notice(
            f"tuning {args.model_name} ({args.task}) on {len(next(iter(split.train.values())))} rows, "
            f"evaluating on {len(next(iter(split.test.values())))}; model id {model_id}"
        )
        with open(folder / "stderr.log", "wb") as err:
            proc = await processes.start("runtime.tune.worker", str(folder), stderr=err, env=env)
        try:
            outcome = await _relay(
                proc, ctx, lambda entry: store.log(self._pool, project_id, model_id, entry)
            )
        finally:
            await processes.kill(proc)  # a cancel stops the training now, not at the end of an epoch
        if "error" in outcome:
            tail = (folder / "stderr.log").read_text(errors="replace")[-2000:]
            log.warning("tuning model %s failed: %s\n%s", model_id, outcome["error"], tail)
            raise lookup(outcome.get("sqlstate", "XX000"))(f"pgml.tune: {outcome['error']}")
        if "result" not in outcome:
            tail = (folder / "stderr.log").read_text(errors="replace")[-500:]
            raise lookup("XX000")(
                f"pgml.tune: the training process ended with code {proc.returncode}: {tail}"
            )
        return _metrics(outcome["result"])


async def _relay(
    proc: asyncio.subprocess.Process, ctx: CallContext, record: Callable[[dict[str, Any]], Awaitable[None]]
) -> dict[str, Any]:
    """Notices and log rows for each line of the worker; returns its last (result or error) line."""
    assert proc.stdout is not None
    outcome: dict[str, Any] = {}
    async for line in proc.stdout:
        message = json.loads(line)
        if "log" in message:
            entry = tune_args.redact(message["log"])
            await ctx.notice(json.dumps(entry, indent=4))
            await record(entry)
        elif "warning" in message:
            await ctx.warning(str(message["warning"]))
        else:
            outcome = message
    await proc.wait()
    return outcome


def _metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """The stored metrics: the eval summary with `eval_f1`/`eval_accuracy` renamed, plus train's."""
    out: dict[str, Any] = {}
    for key, value in dict(result.get("eval") or {}).items():
        out[key.removeprefix("eval_") if key in ("eval_f1", "eval_accuracy") else key] = value
    for key, value in dict(result.get("train") or {}).items():
        out.setdefault(key, value)
    return out


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
