"""Django's ORM on psycopg direct vs through the proxy, both pool modes.

tests/drivers/django_cases.py (its own process: Django is configured once per process) migrates
auth and contenttypes, then runs CRUD, bulk_create, re-executed queries, update/delete counts, a
transaction.atomic() that rolls back on an IntegrityError and a select_for_update() in a
transaction, on one database per target (created here), direct, session proxy and transaction
proxy. What the application sees must equal direct's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fix_postgres import PgServer
from tests.fix_proxy import ProxyProcess

SCRIPT = Path(__file__).resolve().parent / "drivers" / "django_cases.py"

pytest.importorskip("django")


@pytest.fixture(scope="module")
def reports(pg_server: PgServer, proxy: ProxyProcess, proxy_tx: ProxyProcess) -> Any:
    hosts = {"direct": ("127.0.0.1", pg_server.port), "session": (proxy.host, proxy.port),
             "transaction": (proxy_tx.host, proxy_tx.port)}
    for label in hosts:
        pg_server.psql(f"DROP DATABASE IF EXISTS drv_django_{label}")
        pg_server.psql(f"CREATE DATABASE drv_django_{label}")
    args = [f"{label}={host}:{port}/drv_django_{label}" for label, (host, port) in hosts.items()]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], check=True, capture_output=True, text=True,
                         timeout=300, cwd=SCRIPT.parents[2])
    return json.loads(out.stdout)


@pytest.mark.parametrize("pool", ["session", "transaction"])
def test_django_orm_matches_direct(reports: Any, pool: str) -> None:
    want = reports["direct"]
    assert want[9] == ["integrity", "23505"] and len(want) == 14, want
    assert reports[pool] == want
