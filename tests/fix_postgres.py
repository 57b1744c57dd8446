"""pytest plugin: the test session's Postgres (testing/postgres.py), as fixtures.

One server per test session in a temporary data dir. Fixtures: `pg_bin` (the binaries'
folder), `pg_server` (a `PgServer`), `pg_dsn` (a libpq URL for the `postgres` database as
user `postgres`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.postgres import PG_USER, PgServer, free_port, pgserver_bin, start_postgres

__all__ = [
    "PG_USER", "PgServer", "free_port", "pg_bin", "pg_dsn", "pg_server", "pgserver_bin", "start_postgres",
]


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    return pgserver_bin()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    base = Path(tempfile.mkdtemp(prefix="pgml-test-pg-"))
    base.chmod(0o755)
    server = start_postgres(base)
    try:
        server.psql("CREATE EXTENSION IF NOT EXISTS vector")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PgServer) -> str:
    return pg_server.dsn
