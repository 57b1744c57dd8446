"""`pgml.deploy`: by model id, or by strategy (best_score, most_recent, rollback) and algorithm.

Deployments are append-only; the newest row is current. Each deploy NOTIFYs so every
proxy instance re-reads the project's deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import sql

from core.errors import InvalidParameterValue, UndefinedModel

from . import algorithms, registry

STRATEGIES = ("best_score", "most_recent", "rollback")


async def deploy(pool: registry.Pool, call: Mapping[str, Any], user: str = "") -> tuple[str, str, str]:
    """Append the chosen deployment; returns (project, strategy, algorithm).

    `user` (the client's role) must be allowed to write to the project (42501 otherwise).
    """
    async with pool.connection() as conn, conn.transaction():
        if call.get("model_id") is not None:
            cur = await conn.execute(
                "SELECT m.id, m.algorithm, p.id, p.name FROM pgml.models m JOIN pgml.projects p"
                " ON p.id = m.project_id WHERE m.id = %s",
                (int(call["model_id"]),),
            )
            row = await cur.fetchone()
            if row is None:
                raise UndefinedModel(f"model {call['model_id']} does not exist")
            await registry.check_may_write(conn, row[2], user, "deploy")
            await registry.deploy(conn, row[2], row[3], row[0], "specific")
            return (str(row[3]), "specific", str(row[1]))
        name, strategy = str(call["project_name"]), str(call.get("strategy") or "best_score")
        if strategy not in STRATEGIES:
            raise InvalidParameterValue(
                f"deploy strategy {strategy!r} is unknown", hint=f"accepted: {', '.join(STRATEGIES)}"
            )
        proj = await registry.project(conn, name)
        if proj is None:
            raise UndefinedModel(f"project {name!r} does not exist")
        await registry.check_may_write(conn, proj["id"], user, "deploy")
        algorithm = call.get("algorithm")
        model = await _choose(conn, proj, strategy, algorithm)
        if model is None:
            what = f" with algorithm {algorithm!r}" if algorithm else ""
            raise UndefinedModel(f"project {name!r} has no model{what} to deploy with strategy {strategy!r}")
        await registry.deploy(conn, proj["id"], name, model[0], strategy)
        return (name, strategy, str(model[1]))


async def _choose(
    conn: registry.Conn, proj: Mapping[str, Any], strategy: str, algorithm: str | None
) -> tuple[int, str] | None:
    where: sql.Composable = sql.SQL("m.project_id = %(project)s AND m.status = 'successful'")
    if algorithm is not None:
        where = sql.SQL("{} AND m.algorithm = %(algorithm)s").format(where)
    params = {
        "project": proj["id"],
        "algorithm": algorithm,
        "metric": algorithms.TARGET_METRIC.get(proj["task"], "r2"),
    }
    if strategy == "best_score":
        order = sql.SQL("(m.metrics ->> %(metric)s)::float8 DESC NULLS LAST, m.id DESC")
    elif strategy == "most_recent":
        order = sql.SQL("m.id DESC")
    else:  # rollback: the newest previously deployed model other than the current one
        current = await conn.execute(
            "SELECT model_id FROM pgml.deployments WHERE project_id = %s ORDER BY created_at DESC, id DESC"
            " LIMIT 1",
            (proj["id"],),
        )
        row = await current.fetchone()
        params["current"] = row[0] if row else None
        query = sql.SQL(
            "SELECT m.id, m.algorithm FROM pgml.deployments d JOIN pgml.models m ON m.id = d.model_id"
            " WHERE {} AND d.model_id IS DISTINCT FROM %(current)s"
            " ORDER BY d.created_at DESC, d.id DESC LIMIT 1"
        ).format(where)
        cur = await conn.execute(query, params)
        found = await cur.fetchone()
        return (int(found[0]), str(found[1])) if found else None
    pick = sql.SQL("SELECT m.id, m.algorithm FROM pgml.models m WHERE {} ORDER BY {} LIMIT 1")
    cur = await conn.execute(pick.format(where, order), params)
    found = await cur.fetchone()
    return (int(found[0]), str(found[1])) if found else None
