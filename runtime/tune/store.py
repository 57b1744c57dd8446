"""The registry side of `pgml.tune`: the model row's life, its logs, its files and deployment.

A tuned model is visible from the start (`status = 'in_progress'`, as the extension
shows it), then becomes `successful` in ONE transaction that also writes its files, its
metrics and maybe its deployment, or `failed` / `cancelled` with no file and no
deployment. Files go into `pgml.files` in parts; only formats that cannot run code
when loaded are stored (safetensors, JSON, vocabularies), never a pickle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from core.errors import UndefinedModel
from runtime.tabular import registry, storage

from .args import ALGORITHM, TuneArgs
from .data import Split

# What a saved model folder may hold that we store; `*.bin` / `*.pt` (pickles) never are.
_SAFE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")


async def begin(pool: registry.Pool, args: TuneArgs, split: Split) -> tuple[int, int]:
    """Project, snapshot and the in-progress model row, committed; returns (project id, model id)."""
    async with pool.connection() as conn, conn.transaction():
        project_id = await registry.ensure_project(conn, args.project, args.task)
        snapshot_id = await registry.insert_snapshot(
            conn,
            args.relation,
            [c["name"] for c in split.columns if c["role"] == "class"],
            args.test_size,
            args.sampling,
            split.columns,
            {"samples": split.rows, "labels": split.labels},
            args.materialize,
        )
        cur = await conn.execute(
            "INSERT INTO pgml.models (project_id, snapshot_id, num_features, algorithm, runtime, hyperparams,"
            " status, search_params, search_args) VALUES (%s, %s, %s, %s, 'python', %s, 'in_progress',"
            " '{}', '{}') RETURNING id",
            (
                project_id,
                snapshot_id,
                len(split.columns) - (1 if split.labels else 0),
                ALGORITHM,
                Jsonb({**args.hyperparams, "model_name": args.model_name}),
            ),
        )
        model_id = int((await cur.fetchone())[0])  # type: ignore[index]
    return project_id, model_id


async def log(pool: registry.Pool, project_id: int, model_id: int, entry: dict[str, Any]) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO pgml.logs (model_id, project_id, logs) VALUES (%s, %s, %s)",
            (model_id, project_id, Jsonb(entry)),
        )


async def finish(pool: registry.Pool, model_id: int, status: str) -> None:
    """Mark a model that will get no files ('failed', 'cancelled')."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE pgml.models SET status = %s, updated_at = clock_timestamp()"
            " WHERE id = %s AND status = 'in_progress'",
            (status, model_id),
        )


def model_files(folder: Path) -> list[tuple[str, int, bytes]]:
    """(path, part, bytes) of every storable file of a saved model folder."""
    out: list[tuple[str, int, bytes]] = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not file.name.endswith(_SAFE_SUFFIXES):
            continue
        rel = str(file.relative_to(folder))
        out.extend((rel, i, part) for i, part in enumerate(storage.parts(file.read_bytes())))
    return out


async def complete(
    pool: registry.Pool,
    args: TuneArgs,
    project_id: int,
    model_id: int,
    metrics: dict[str, Any],
    files: list[tuple[str, int, bytes]],
) -> bool:
    """Files, metrics, 'successful' and maybe the deployment in one transaction; returns deployed."""
    async with pool.connection() as conn, conn.transaction():
        async with conn.cursor().copy("COPY pgml.files (model_id, path, part, data) FROM STDIN") as copy:
            for path, part, data in files:
                await copy.write_row((model_id, path, part, data))
        await conn.execute(
            "UPDATE pgml.models SET status = 'successful', metrics = %s, updated_at = clock_timestamp()"
            " WHERE id = %s",
            (Jsonb(metrics), model_id),
        )
        if not args.automatic_deploy or not await _beats_deployed(conn, args.task, project_id, metrics):
            return False
        await registry.deploy(conn, project_id, args.project, model_id, "new_score")
        return True


def target_metric(task: str) -> tuple[str, bool]:
    """(metric, higher is better) that decides automatic deployment."""
    return ("eval_loss", False) if task == "conversation" else ("f1", True)


async def _beats_deployed(conn: registry.Conn, task: str, project_id: int, metrics: dict[str, Any]) -> bool:
    metric, higher = target_metric(task)
    current = await registry.deployed_metric(conn, project_id, metric)
    new = metrics.get(metric)
    if current is None:
        return True
    if new is None:
        return False
    if current == float("-inf"):  # the deployed model has no such metric
        return True
    return bool(new >= current) if higher else bool(new <= current)


async def deployed_tuned(pool: registry.Pool, name: str) -> tuple[int, str] | None:
    """(model id, task) of project `name`'s deployed model when it is a tuned one, else None."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT d.model_id, p.task FROM pgml.projects p JOIN LATERAL"
            " (SELECT model_id FROM pgml.deployments WHERE project_id = p.id"
            "  ORDER BY created_at DESC, id DESC LIMIT 1) d ON true"
            " JOIN pgml.models m ON m.id = d.model_id WHERE p.name = %s AND m.algorithm = %s",
            (name, ALGORITHM),
        )
        row = await cur.fetchone()
    return (int(row[0]), str(row[1])) if row else None


async def write_folder(pool: registry.Pool, model_id: int, target: Path) -> None:
    """Write model `model_id`'s files from pgml.files into `target` (a fresh folder)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT path, data FROM pgml.files WHERE model_id = %s ORDER BY path, part", (model_id,)
        )
        rows = await cur.fetchall()
    if not rows:
        raise UndefinedModel(f"model {model_id} has no files in pgml.files")
    target.mkdir(parents=True)
    for path, data in rows:
        dest = (target / str(path)).resolve()
        if not dest.is_relative_to(target.resolve()) or not dest.name.endswith(_SAFE_SUFFIXES):
            continue  # a path that would leave the folder, or a file type we never load
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "ab") as fh:
            fh.write(bytes(data))


async def base_name(pool: registry.Pool, model_id: int) -> str:
    """The model_name a tuned model was trained from (recorded in its hyperparams)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT hyperparams ->> 'model_name' FROM pgml.models WHERE id = %s", (model_id,)
        )
        row = await cur.fetchone()
    if row is None or not row[0]:
        raise UndefinedModel(f"model {model_id} does not record the base model it was tuned from")
    return str(row[0])


async def model_stamp(pool: registry.Pool, model_id: int) -> str:
    """A short key unique to this model row anywhere: database, id and creation time."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT current_database() || ':' || id || ':' || created_at::text"
            " FROM pgml.models WHERE id = %s",
            (model_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise UndefinedModel(f"model {model_id} does not exist")
    return hashlib.sha256(str(row[0]).encode()).hexdigest()[:12]
