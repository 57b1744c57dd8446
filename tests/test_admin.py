"""The admin database and the metrics endpoint.

Unit tier: `proxy.admin.answer` and `proxy.metrics.start` over a fixed snapshot (a plain
object shaped like the proxy's), scraped over real HTTP. Integration tier: psql and
psycopg connect to database ``pgml_proxy`` through the real proxy while other clients
work, and the views and the Prometheus counters must show exactly that work.
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from core.errors import ConfigError, InvalidParameterValue, PgError
from core.interfaces import QueryResult
from proxy import admin, metrics
from proxy.config import Config
from tests.fix_postgres import free_port

SNAPSHOT = {
    "pools": [{"database": "app", "user": "alice", "mode": "transaction", "size": 20, "active": 2, "idle": 3,
               "waiting": 1}],
    "clients": [
        {"id": 1, "addr": "127.0.0.1:50001", "database": "app", "user": "alice", "application_name": "web",
         "state": "active", "connected_at": "2026-01-01 10:00:00+00"},
        {"id": 2, "addr": "127.0.0.1:50002", "database": "app", "user": "alice", "application_name": "",
         "state": "idle", "connected_at": "2026-01-01 10:00:01+00"},
        {"id": 3, "addr": "127.0.0.1:50003", "database": "app", "user": "alice", "application_name": "",
         "state": "waiting", "connected_at": "2026-01-01 10:00:02+00"},
    ],
    "servers": [{"id": 7, "database": "app", "user": "alice", "state": "active", "backend_pid": 4242,
                 "client_id": 1}],
    "counters": {"queries": 120, "pgml_queries": 7, "bytes_in": 5000, "bytes_out": 90000, "errors": 2,
                 "wait_time": 0.25},
}


@dataclass
class Runtime:
    def models_info(self) -> list[dict[str, Any]]:
        # The fields runtime.Runtime.models_info() gives (runtime/model_cache.py).
        return [{"name": "intfloat/e5-small-v2", "kind": "embed", "engine": "onnxruntime", "device": "cpu",
                 "precision": "fp32", "memory_bytes": 133_000_000, "loaded_at": 1767261600.0,
                 "load_seconds": 1.25, "batches": 4, "items": 300}]


@dataclass
class FixedServer:
    """Shaped like the proxy's server object as admin and metrics read it; state fixed."""

    config: Config = field(default_factory=lambda: Config(users={"alice": "secret"}, pool_mode="transaction"))
    runtime: Runtime = field(default_factory=Runtime)
    reloads: int = 0
    fail_reload: bool = False

    def snapshot(self) -> dict[str, Any]:
        return SNAPSHOT

    def load_config(self) -> Config:
        if self.fail_reload:
            raise ConfigError("pool_mode", "expected one of ('session', 'transaction')")
        return Config(pool_mode="session")

    def reload(self, config: Config) -> None:
        self.config = config
        self.reloads += 1


def _rows(result: QueryResult) -> list[dict[str, str | None]]:
    assert result.columns is not None
    names = [c.name for c in result.columns]
    return [dict(zip(names, [v.decode() if v is not None else None for v in row], strict=True))
            for row in result.rows]


async def test_show_views_over_a_fixed_snapshot() -> None:
    server = FixedServer()
    sql = "SHOW POOLS; show clients;SHOW SERVERS; SHOW STATS;"
    pools, clients, servers, stats = await admin.answer(sql, server)
    assert pools.command_tag == "SHOW"
    assert _rows(pools) == [{"database": "app", "user": "alice", "cl_active": "2", "cl_waiting": "1",
                             "sv_active": "2", "sv_idle": "3", "pool_size": "20", "pool_mode": "transaction"}]
    assert pools.columns is not None and [c.type_oid for c in pools.columns][2:4] == [20, 20]
    assert [r["application_name"] for r in _rows(clients)] == ["web", "", ""]
    assert _rows(servers) == [{"id": "7", "user": "alice", "database": "app", "state": "active",
                               "remote_pid": "4242", "link": "1", "server": None, "role": None,
                               "banned": None, "lag_bytes": None}]
    assert _rows(stats) == [{"database": "*", "total_query_count": "120", "total_pgml_query_count": "7",
                             "total_received": "5000", "total_sent": "90000", "total_errors": "2",
                             "total_wait_time": "250000"}]


async def test_show_config_hides_passwords_and_models_lists_runtime() -> None:
    server = FixedServer()
    (config,) = await admin.answer("SHOW CONFIG", server)
    by_key = {r["key"]: r for r in _rows(config)}
    assert by_key["pool_mode"]["value"] == "transaction" and by_key["pool_mode"]["default"] == "session"
    assert by_key["users"]["value"] == "alice"
    assert all("secret" not in (r["value"] or "") for r in by_key.values())
    (models,) = await admin.answer("SHOW MODELS", server)
    assert _rows(models) == [{"name": "intfloat/e5-small-v2", "kind": "embed", "engine": "onnxruntime",
                              "device": "cpu", "precision": "fp32", "memory_bytes": "133000000",
                              "loaded_at": "2026-01-01 10:00:00 UTC", "load_seconds": "1.25", "batches": "4",
                              "items": "300"}]


async def test_reload_help_and_errors() -> None:
    server = FixedServer()
    (reload,) = await admin.answer("RELOAD;", server)
    assert reload.command_tag == "RELOAD" and reload.columns is None and server.reloads == 1
    assert server.config.pool_mode == "session"
    (help_,) = await admin.answer("show help", server)
    assert "RELOAD" in [r["command"] for r in _rows(help_)]
    assert await admin.answer("  ;  ", server) == []
    with pytest.raises(PgError) as bad:
        await admin.answer("SHOW POOLS; DROP TABLE x", server)
    assert bad.value.code == "42601" and "SHOW POOLS" in bad.value.fields["H"]
    server.fail_reload = True
    with pytest.raises(InvalidParameterValue, match=r"configuration unchanged.*pool_mode"):
        await admin.answer("RELOAD", server)
    assert server.reloads == 1


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def test_metrics_scrape_over_http() -> None:
    port = free_port()
    handle = metrics.start(Config(metrics_port=port), FixedServer())
    assert handle is not None and handle.port == port
    try:
        scraped = await asyncio.to_thread(_scrape, port)
    finally:
        await handle.close()
    assert scraped["pgml_proxy_queries_total"] == [({"database": "*"}, 120.0)]
    assert scraped["pgml_proxy_wait_seconds_total"] == [({"database": "*"}, 0.25)]
    pool_labels = {"database": "app", "user": "alice", "mode": "transaction"}
    assert scraped["pgml_proxy_pool_waiting"] == [(pool_labels, 1.0)]
    states = {labels["state"]: value for labels, value in scraped["pgml_proxy_clients"]}
    assert states == {"active": 1.0, "idle": 1.0, "waiting": 1.0}
    assert scraped["pgml_proxy_models_loaded"] == [({}, 1.0)]
    assert scraped["pgml_proxy_model_items_total"] == [({"name": "intfloat/e5-small-v2"}, 300.0)]
    assert "pgml_proxy_process_resident_memory_bytes" in scraped
    assert metrics.start(Config(), FixedServer()) is None  # metrics_port 0: off


# --- through the real proxy ----------------------------------------------------------------------


def _admin_dsn(dsn: str) -> str:
    return make_conninfo(dsn, dbname="pgml_proxy")


def _show(conn: psycopg.Connection[Any], what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_admin_views_through_proxy(own_proxy: Callable[..., Any]) -> None:
    proxy = own_proxy(pool_mode="session")
    with psycopg.connect(proxy.dsn(), application_name="admin-test-worker", autocommit=True) as worker, \
            psycopg.connect(_admin_dsn(proxy.dsn()), autocommit=True) as console:
        worker.execute("BEGIN")
        pid = worker.execute("SELECT pg_backend_pid()").fetchone()
        clients = _show(console, "CLIENTS")
        mine = [c for c in clients if c["application_name"] == "admin-test-worker"]
        assert len(mine) == 1 and mine[0]["database"] == "postgres" and mine[0]["user"] == "postgres"
        servers = _show(console, "SERVERS")
        assert pid is not None and pid[0] in [s["remote_pid"] for s in servers]
        linked = [s for s in servers if s["remote_pid"] == pid[0]]
        assert linked[0]["link"] == mine[0]["id"]
        pools = [p for p in _show(console, "POOLS") if p["database"] == "postgres"]
        assert pools and pools[0]["sv_active"] >= 1 and pools[0]["pool_mode"] == "session"
        worker.execute("COMMIT")
        config = {r["key"]: r["value"] for r in _show(console, "CONFIG")}
        assert config["pool_mode"] == "session"
        with pytest.raises(psycopg.errors.SyntaxError) as bad:
            console.execute("SHOW NONSENSE")
        assert bad.value.diag.message_hint is not None and "SHOW POOLS" in bad.value.diag.message_hint
        assert _show(console, "HELP")  # still usable after the error


def test_stats_and_metrics_count_queries(own_proxy: Callable[..., Any]) -> None:
    port = free_port()
    proxy = own_proxy(pool_mode="transaction", metrics_port=port)
    with psycopg.connect(_admin_dsn(proxy.dsn()), autocommit=True) as console:
        before = _show(console, "STATS")
        scraped_before = _scrape(port)
        with psycopg.connect(proxy.dsn(), autocommit=True) as worker:
            for i in range(10):
                assert worker.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            with pytest.raises(psycopg.errors.DivisionByZero):
                worker.execute("SELECT 1/%s", (0,))  # extended protocol
        after = _show(console, "STATS")
        scraped_after = _scrape(port)
    def grew(column: str) -> int:
        return int(sum(r[column] for r in after) - sum(r[column] for r in before))

    def metric_grew(name: str) -> float:
        values = [sum(v for _, v in s.get(name, [])) for s in (scraped_before, scraped_after)]
        return values[1] - values[0]

    assert grew("total_query_count") >= 11 and grew("total_errors") >= 1 and grew("total_sent") > 0
    assert metric_grew("pgml_proxy_queries_total") >= 11
    assert metric_grew("pgml_proxy_errors_total") >= 1
    sizes = scraped_after["pgml_proxy_pool_size"]
    assert any(labels["mode"] == "transaction" and value >= 1 for labels, value in sizes)


def test_psql_against_admin_database(proxy_dsn: str, pg_bin: Path) -> None:
    out = subprocess.run(
        [str(pg_bin / "psql"), "-X", "-A", "-F", "|", "-d", _admin_dsn(proxy_dsn), "-c", "SHOW POOLS",
         "-c", "SHOW HELP"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "database|user|cl_active|cl_waiting|sv_active|sv_idle|pool_size|pool_mode"
    assert "SHOW POOLS|server connection pools per (database, user)" in lines
    bad = subprocess.run(
        [str(pg_bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", _admin_dsn(proxy_dsn), "-c", "SHOW"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert bad.returncode != 0 and "unknown admin command" in bad.stderr


def test_reload_through_proxy(own_proxy: Callable[..., Any]) -> None:
    proxy = own_proxy()
    with psycopg.connect(_admin_dsn(proxy.dsn()), autocommit=True) as console:
        assert console.execute("RELOAD").statusmessage == "RELOAD"


def test_simple_query_errors_are_counted(own_proxy: Callable[..., Any]) -> None:
    proxy = own_proxy()
    with psycopg.connect(_admin_dsn(proxy.dsn()), autocommit=True) as console:
        before = sum(r["total_errors"] for r in _show(console, "STATS"))
        with psycopg.connect(proxy.dsn(), autocommit=True) as worker, \
                pytest.raises(psycopg.errors.DivisionByZero):
            worker.execute("SELECT 1/0")
        assert sum(r["total_errors"] for r in _show(console, "STATS")) == before + 1


async def test_reload_without_a_loader_says_how() -> None:
    class Server(FixedServer):
        load_config = None  # type: ignore[assignment]

    with pytest.raises(PgError) as bad:
        await admin.answer("RELOAD", Server())
    assert bad.value.code == "0A000" and "SIGHUP" in bad.value.fields["H"]
