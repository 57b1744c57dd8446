"""Versioned migrations of the upstream's `pgml` schema (files in runtime/sql/, applied in order).

Each `NNNN_name.sql` file runs once, in one transaction, and is recorded in
`pgml.migrations`. A transaction-scoped advisory lock serialises proxies that start at
the same moment, so exactly one of them applies a given version.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# An arbitrary constant that names "pgml schema migrations" among advisory locks.
_LOCK_KEY = 0x70676D6C


def migration_files(sql_dir: Path = SQL_DIR) -> list[tuple[int, Path]]:
    """The migration files, ordered by version; raises ValueError on a duplicated version."""
    found: dict[int, Path] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version}: {found[version]} and {path}")
        found[version] = path
    return sorted(found.items())


async def migrate(conn: psycopg.AsyncConnection[object]) -> list[int]:
    """Apply the pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute("CREATE SCHEMA IF NOT EXISTS pgml")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS pgml.migrations (version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM pgml.migrations")
        done = {int(row[0]) for row in await cur.fetchall()}  # type: ignore[index]
        for version, path in migration_files():
            if version in done:
                continue
            # The files are ours, shipped with the package: no client text reaches here.
            await conn.execute(path.read_text().encode())
            await conn.execute(
                "INSERT INTO pgml.migrations (version, name) VALUES (%s, %s)", (version, path.name)
            )
            applied_now.append(version)
        await _ensure_pgvector(conn)
    return applied_now


async def _ensure_pgvector(conn: psycopg.AsyncConnection[object]) -> None:
    """Create pgvector where the server has it but the database does not, as PostgresML's image does.

    The README's vector-database examples (`::vector`, ivfflat and hnsw indexes) need it. A role
    without the right to create extensions keeps working without it: a warning says why.
    """
    cur = await conn.execute(
        "SELECT installed_version IS NOT NULL FROM pg_available_extensions WHERE name = 'vector'"
    )
    row = await cur.fetchone()
    if row is None or row[0]:  # type: ignore[index]
        return  # not available on this server, or already there
    try:
        async with conn.transaction():  # a savepoint: a refusal must not undo the migrations
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        log.info("created the pgvector extension in the upstream database")
    except psycopg.Error as exc:
        log.warning("pgvector is available but could not be created (%s): ::vector will not work", exc)
