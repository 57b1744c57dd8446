"""The upstream side of tabular ML: the runtime's connection pool, reading relations, and the registry.

Reads of training relations aggregate each column into one array in one scan, fetched in
binary and decoded by psycopg's C loaders (never a Python loop per row). Registry writes
(project, snapshot, model, files, deployment) happen in one transaction, so a failed or
cancelled training leaves nothing behind. Deploys NOTIFY `pgml_deploy` with the project
name so that every proxy instance drops its cached deployment at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import errors as pgerr
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from core.errors import (
    DataException,
    FeatureNotSupported,
    InsufficientPrivilege,
    InvalidParameterValue,
    UndefinedModel,
    UndefinedTable,
)

from . import preprocess, storage
from .compiled import ONNX_PATH

DEPLOY_CHANNEL = "pgml_deploy"
Conn = psycopg.AsyncConnection[Any]


# The runtime's one way to the upstream: registry reads and writes, training reads and
# the LISTEN connection all come from this pool (psycopg_pool), which checks a connection
# before lending it and reconnects in the background after the upstream restarts.
Pool = AsyncConnectionPool[Conn]


def new_pool(dsn: str, size: int) -> Pool:
    """Up to `size` autocommit connections (one more for LISTEN), checked on every checkout.

    Not opened here (`await pool.open()` in the runtime's start): a pool opens on a loop.
    """
    return AsyncConnectionPool(
        dsn,
        kwargs={"autocommit": True},
        min_size=1,
        max_size=size + 1,
        open=False,
        check=AsyncConnectionPool.check_connection,
        name="pgml-runtime",
        timeout=30.0,
        reconnect_timeout=60.0,
    )


async def relation_columns(conn: Conn, relation: str) -> list[tuple[str, str]]:
    """(name, SQL type) of a table or view's columns in order; UndefinedTable when it is missing."""
    try:
        cur = await conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (relation,),
        )
    except (pgerr.UndefinedTable, pgerr.InvalidSchemaName, pgerr.InvalidName) as exc:
        raise UndefinedTable(f"relation {relation!r} does not exist") from exc
    return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]


async def check_can_read(conn: Conn, relation: str, user: str) -> None:
    """42501 unless the client's role may SELECT `relation`, as Postgres would say it.

    Training reads on the runtime's own connection (the proxy's upstream role), so the
    client's own privileges are checked first: pgml.train must not read what the client
    could not. An empty `user` (a call from inside the proxy) is not checked.
    """
    if not user:
        return
    cur = await conn.execute(
        "SELECT has_table_privilege(%s, c.oid, 'SELECT'), c.oid::regclass::text,"
        # Row-level security the proxy's own read would not apply on the client's behalf.
        " c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls"
        "  OR (pg_has_role(r.oid, c.relowner, 'MEMBER') AND NOT c.relforcerowsecurity))"
        " FROM pg_class c, pg_roles r WHERE c.oid = %s::regclass AND r.rolname = %s",
        (user, relation, user),
    )
    allowed, name, policed = await cur.fetchone() or (False, relation, False)
    if not allowed:
        raise InsufficientPrivilege(
            f"permission denied for table {name}",
            detail=f'role "{user}" may not SELECT from it, so pgml.train and pgml.snapshot may not read it',
        )
    if policed:
        raise FeatureNotSupported(
            f"table {name} has row-level security, which pgml-proxy cannot apply to a training read",
            detail="training reads on the proxy's own connection, which would see every row",
            hint="train on a table or materialized view holding only the rows the role may see",
        )


def _qualified(relation: str) -> sql.Composable:
    """The relation as SQL: its name is resolved by regclass, then quoted part by part."""
    return sql.SQL("{}::regclass").format(sql.Literal(relation))


async def read_columns(
    conn: Conn, relation: str, kinds: Sequence[tuple[str, str]]
) -> tuple[dict[str, Any], int]:
    """Each column's values as one array (one scan, binary); returns (columns, row count)."""
    cast = {"numeric": "::float8", "bool": "::int::float8", "array": "::float8[]", "text": "::text"}
    exprs = [sql.SQL("array_agg({}{})").format(sql.Identifier(n), sql.SQL(cast[k])) for n, k in kinds]
    cur = await conn.execute("SELECT %s::regclass::text", (relation,))
    rel_sql = (await cur.fetchone() or [relation])[0]
    query = sql.SQL("SELECT count(*), {} FROM {}").format(sql.SQL(", ").join(exprs), sql.SQL(rel_sql))
    try:
        cur = conn.cursor(binary=True)
        await cur.execute(query)
        row = await cur.fetchone()
    except pgerr.ArraySubscriptError as exc:
        raise DataException(f"array columns of {relation!r} must all have the same shape: {exc}") from exc
    except pgerr.NullValueNotAllowed as exc:
        raise DataException(f"array columns of {relation!r} hold NULL arrays: {exc}") from exc
    assert row is not None
    n = int(row[0])
    out: dict[str, Any] = {}
    for (name, kind), values in zip(kinds, row[1:], strict=True):
        values = values or []
        if kind == "array":
            arr = np.asarray(values, dtype=np.float64)
            out[name] = arr.reshape(n, -1)
        elif kind == "text":
            out[name] = np.asarray(values, dtype=object)
        else:
            out[name] = (
                np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
                if any(v is None for v in values)
                else np.asarray(values, dtype=np.float64)
            )
    return out, n


async def project(conn: Conn, name: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT id, name, task, owner FROM pgml.projects WHERE name = %s", (name,))
    return await cur.fetchone()


async def last_snapshot(conn: Conn, project_id: int) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT s.* FROM pgml.snapshots s JOIN pgml.models m ON m.snapshot_id = s.id"
        " WHERE m.project_id = %s ORDER BY m.id DESC LIMIT 1",
        (project_id,),
    )
    return await cur.fetchone()


async def insert_snapshot(
    conn: Conn,
    relation: str,
    y: list[str],
    test_size: float,
    sampling: str,
    columns: list[dict[str, Any]],
    analysis: dict[str, Any],
    materialize: bool,
) -> int:
    cur = await conn.execute(
        "INSERT INTO pgml.snapshots (relation_name, y_column_name, test_size, test_sampling, status,"
        " columns, analysis, materialized) VALUES (%s, %s, %s, %s, 'successful', %s, %s, %s) RETURNING id",
        (relation, y, test_size, sampling, Jsonb(columns), Jsonb(analysis), materialize),
    )
    snapshot_id = int((await cur.fetchone())[0])  # type: ignore[index]
    if materialize:
        await conn.execute(
            sql.SQL("CREATE TABLE {} AS SELECT * FROM {}").format(
                sql.Identifier("pgml", f"snapshot_{snapshot_id}"), sql.SQL(await _regclass(conn, relation))
            )
        )
    return snapshot_id


async def _regclass(conn: Conn, relation: str) -> str:
    cur = await conn.execute("SELECT %s::regclass::text", (relation,))
    return str((await cur.fetchone())[0])  # type: ignore[index]


async def ensure_project(conn: Conn, name: str, task: str, owner: str = "") -> int:
    """The project's id, creating it owned by `owner`; 22023 when it exists with another task,
    42501 when it exists and `owner` may not write to it (see check_may_write)."""
    await conn.execute(
        "INSERT INTO pgml.projects (name, task, owner) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
        (name, task, owner or None),
    )
    cur = await conn.execute("SELECT id, task FROM pgml.projects WHERE name = %s", (name,))
    pid, existing = await cur.fetchone()  # type: ignore[misc]
    if existing != task:
        raise InvalidParameterValue(f"project {name!r} has task {existing!r}, not {task!r}")
    await check_may_write(conn, int(pid), owner, "train into")
    return int(pid)


async def check_may_write(conn: Conn, project_id: int, user: str, action: str) -> None:
    """42501 unless `user` owns the project, is a member of its owner role, holds a grant
    (pgml_proxy.grant_project) or is a superuser; projects without an owner are open.

    An empty `user` (a call from inside the proxy) is not checked.
    """
    if not user:
        return
    cur = await conn.execute(
        "SELECT p.name, p.owner, pgml_proxy.may_write_project(p.id, %s) FROM pgml.projects p WHERE p.id = %s",
        (user, project_id),
    )
    row = await cur.fetchone()
    if row is None or row[2]:
        return
    raise InsufficientPrivilege(
        f'must be owner of project "{row[0]}" to {action} it (owned by {row[1]})',
        detail=f'role "{user}" is not a member of role "{row[1]}" and holds no grant on the project',
        hint=f"the owner can run SELECT pgml_proxy.grant_project('{row[0]}', '{user}')",
    )


async def insert_model(conn: Conn, values: dict[str, Any], files: list[tuple[str, int, bytes]]) -> int:
    cur = await conn.execute(
        "INSERT INTO pgml.models (project_id, snapshot_id, num_features, algorithm, runtime, hyperparams,"
        " status, metrics, search, search_params, search_args) VALUES (%s, %s, %s, %s, 'python', %s,"
        " 'successful', %s, %s, %s, %s) RETURNING id",
        (
            values["project_id"],
            values["snapshot_id"],
            values["num_features"],
            values["algorithm"],
            Jsonb(values["hyperparams"]),
            Jsonb(values["metrics"]),
            values["search"],
            Jsonb(values["search_params"]),
            Jsonb(values["search_args"]),
        ),
    )
    model_id = int((await cur.fetchone())[0])  # type: ignore[index]
    async with conn.cursor().copy("COPY pgml.files (model_id, path, part, data) FROM STDIN") as copy:
        for path, part, data in files:
            await copy.write_row((model_id, path, part, data))
    return model_id


async def deployed_metric(conn: Conn, project_id: int, metric: str) -> float | None:
    """The target metric of the project's current deployment, None when nothing is deployed."""
    cur = await conn.execute(
        "SELECT (m.metrics ->> %s)::float8 FROM pgml.deployments d JOIN pgml.models m ON m.id = d.model_id"
        " WHERE d.project_id = %s ORDER BY d.created_at DESC, d.id DESC LIMIT 1",
        (metric, project_id),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return float(row[0]) if row[0] is not None else float("-inf")


async def deploy(conn: Conn, project_id: int, project_name: str, model_id: int, strategy: str) -> None:
    """Append a deployment and NOTIFY (delivered when the surrounding transaction commits)."""
    await conn.execute(
        "INSERT INTO pgml.deployments (project_id, model_id, strategy) VALUES (%s, %s, %s)",
        (project_id, model_id, strategy),
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (DEPLOY_CHANNEL, project_name))


async def deployed_model_id(conn: Conn, project_name: str) -> int:
    """The id of the project's deployed model; UndefinedModel naming what is missing."""
    cur = await conn.execute(
        "SELECT p.id, d.model_id FROM pgml.projects p LEFT JOIN LATERAL"
        " (SELECT model_id FROM pgml.deployments WHERE project_id = p.id"
        " ORDER BY created_at DESC, id DESC LIMIT 1) d ON true WHERE p.name = %s",
        (project_name,),
    )
    row = await cur.fetchone()
    if row is None:
        raise UndefinedModel(
            f"project {project_name!r} does not exist", hint="train it first with pgml.train"
        )
    if row[1] is None:
        raise UndefinedModel(f"project {project_name!r} has no deployed model")
    return int(row[1])


async def model_record(conn: Conn, model_id: int) -> dict[str, Any]:
    """The model row with its project, task and snapshot columns, and its file bytes."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT m.id, m.algorithm, m.num_features, m.status, p.name AS project, p.task, s.columns,"
        " m.snapshot_id, s.relation_name, s.materialized"
        " FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
        " LEFT JOIN pgml.snapshots s ON s.id = m.snapshot_id WHERE m.id = %s",
        (model_id,),
    )
    rec = await cur.fetchone()
    if rec is None:
        raise UndefinedModel(f"model {model_id} does not exist")
    cur2 = await conn.execute(
        "SELECT path, data FROM pgml.files WHERE model_id = %s ORDER BY path, part", (model_id,)
    )
    files: dict[str, list[bytes]] = {}
    for path, data in await cur2.fetchall():
        files.setdefault(path, []).append(bytes(data))
    # The ONNX form (runtime.tabular.compiled) lies beside the native file; it is not the model.
    onnx = files.pop(ONNX_PATH, None)
    if not files:
        raise UndefinedModel(f"model {model_id} has no file in pgml.files")
    rec["path"], chunks = next(iter(files.items()))
    rec["data"] = b"".join(chunks)
    rec["onnx"] = None if onnx is None else b"".join(onnx)
    return rec


async def add_file(conn: Conn, model_id: int, path: str, blob: bytes) -> bool:
    """Store one more file of a model (in parts); False when another instance stored it first."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('pgml.files'), %s),"
            " EXISTS (SELECT 1 FROM pgml.files WHERE model_id = %s AND path = %s)",
            (model_id, model_id, path),
        )
        row = await cur.fetchone()
        if row is None or row[1]:
            return False
        for part, data in enumerate(storage.parts(blob)):
            await conn.execute(
                "INSERT INTO pgml.files (model_id, path, part, data) VALUES (%s, %s, %s, %s)",
                (model_id, path, part, data),
            )
    return True


def feature_specs(columns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in columns if not c.get("label")]


def label_specs(columns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in columns if c.get("label")]


def kinds(columns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, preprocess.kind_of(t)) for n, t in columns]
