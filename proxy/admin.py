"""The admin database ``pgml_proxy``: SHOW POOLS/CLIENTS/SERVERS/STATS/CONFIG/MODELS/HELP and RELOAD.

`answer(sql, server)` turns one Query's text into `QueryResult`s (text-format values);
the proxy writes them back as it writes any result. It reads `server.snapshot()` (sync
or async; mappings or objects, see `Snapshot`), `server.config`, `server.load_config()`
with `server.reload(config)` (RELOAD), and, when the runtime offers it,
`server.runtime.models_info()`. Columns are named like
PgBouncer's where they mean the same, so existing dashboards and habits carry over.
`take_snapshot` is shared with `proxy.metrics`.
"""

from __future__ import annotations

import datetime
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from core.errors import FeatureNotSupported, InvalidParameterValue, PgError, SyntaxError_
from core.interfaces import Column, QueryResult

INT8, TEXT, FLOAT8 = 20, 25, 701


def field_of(obj: Any, key: str, default: Any = None) -> Any:
    """A field of a snapshot entry, whether it is a mapping or an object."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass(slots=True)
class Snapshot:
    """What the admin console and the metrics read, normalised from `server.snapshot()`.

    pools: database, user, mode, size, active, idle, waiting.
    clients: id, addr, database, user, application_name, state, connected_at.
    servers: id, database, user, state, backend_pid, client_id, and (replicas) server, role,
    banned, lag_bytes; a health-check connection per upstream server has state "health".
    counters: queries, pgml_queries, bytes_in, bytes_out, errors, wait_time (seconds).
    """

    pools: list[Any] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)
    counters: Any = field(default_factory=dict)
    models: list[Any] = field(default_factory=list)


async def take_snapshot(server: Any) -> Snapshot:
    """Read the server's state once (and the runtime's models, when it lists them)."""
    raw = await _maybe_await(server.snapshot())
    snap = Snapshot(
        pools=list(field_of(raw, "pools", []) or []),
        clients=list(field_of(raw, "clients", []) or []),
        servers=list(field_of(raw, "servers", []) or []),
        counters=field_of(raw, "counters", {}) or {},
    )
    runtime = getattr(server, "runtime", None)
    models_info = getattr(runtime, "models_info", None)
    if callable(models_info):
        snap.models = list(await _maybe_await(models_info()) or [])
    return snap


def _timestamp(value: Any) -> Any:
    """Unix times are shown as PgBouncer shows its connect_time: UTC text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return value


def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, float):
        return repr(value).encode()
    if hasattr(value, "isoformat"):  # datetime: shown as PgBouncer does, in text
        return str(value.isoformat(sep=" ", timespec="seconds")).encode()
    return str(value).encode()


def _result(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[Any]], tag: str) -> QueryResult:
    cols = [Column(name, oid, type_size=8 if oid in (INT8, FLOAT8) else -1) for name, oid in columns]
    return QueryResult(cols, [[_text(v) for v in row] for row in rows], tag)


def _count(value: Any) -> int:
    return int(value or 0)


def _show_pools(snap: Snapshot) -> QueryResult:
    columns = [("database", TEXT), ("user", TEXT), ("cl_active", INT8), ("cl_waiting", INT8),
               ("sv_active", INT8), ("sv_idle", INT8), ("pool_size", INT8), ("pool_mode", TEXT)]
    rows = []
    for pool in snap.pools:
        db, user = field_of(pool, "database"), field_of(pool, "user")
        waiting = _count(field_of(pool, "waiting"))
        mine = [c for c in snap.clients if field_of(c, "database") == db and field_of(c, "user") == user]
        cl_active = field_of(pool, "cl_active", max(len(mine) - waiting, 0))
        rows.append([db, user, _count(cl_active), waiting, _count(field_of(pool, "active")),
                     _count(field_of(pool, "idle")), _count(field_of(pool, "size")), field_of(pool, "mode")])
    return _result(columns, rows, "SHOW")


def _show_clients(snap: Snapshot) -> QueryResult:
    columns = [("id", INT8), ("user", TEXT), ("database", TEXT), ("state", TEXT), ("addr", TEXT),
               ("application_name", TEXT), ("connect_time", TEXT)]
    keys = ("id", "user", "database", "state", "addr", "application_name")
    rows = [[*(field_of(c, key) for key in keys), _timestamp(field_of(c, "connected_at"))]
            for c in snap.clients]
    return _result(columns, rows, "SHOW")


def _show_servers(snap: Snapshot) -> QueryResult:
    columns = [("id", INT8), ("user", TEXT), ("database", TEXT), ("state", TEXT), ("remote_pid", INT8),
               ("link", INT8), ("server", TEXT), ("role", TEXT), ("banned", TEXT), ("lag_bytes", INT8)]
    rows = [[field_of(s, "id"), field_of(s, "user"), field_of(s, "database"), field_of(s, "state"),
             field_of(s, "backend_pid"), field_of(s, "client_id"), field_of(s, "server"),
             field_of(s, "role"), field_of(s, "banned"), field_of(s, "lag_bytes")] for s in snap.servers]
    return _result(columns, rows, "SHOW")


STAT_COLUMNS = (
    # (column, counter key, scale): wait time is kept in seconds, shown in microseconds as PgBouncer does.
    ("total_query_count", "queries", 1),
    ("total_pgml_query_count", "pgml_queries", 1),
    ("total_received", "bytes_in", 1),
    ("total_sent", "bytes_out", 1),
    ("total_errors", "errors", 1),
    ("total_wait_time", "wait_time", 1_000_000),
)


def _show_stats(snap: Snapshot) -> QueryResult:
    columns = [("database", TEXT), *((name, INT8) for name, _, _ in STAT_COLUMNS)]
    counters = snap.counters
    # One row per database when the server keeps counters per database, else one row for all ("*").
    per_db = counters if isinstance(counters, list) else [counters]
    rows = []
    for entry in per_db:
        row: list[Any] = [field_of(entry, "database", "*")]
        row += [int(float(field_of(entry, key, 0) or 0) * scale) for _, key, scale in STAT_COLUMNS]
        rows.append(row)
    return _result(columns, rows, "SHOW")


def _config_value(key: str, value: Any) -> str:
    if key == "users":  # never show passwords or verifiers
        return ", ".join(sorted(value))
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True, default=str)
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _show_config(server: Any) -> QueryResult:
    config: Any = getattr(server, "config", None)
    if config is None or not is_dataclass(config) or isinstance(config, type):
        return _result([("key", TEXT), ("value", TEXT), ("default", TEXT)], [], "SHOW")
    default: Any = type(config)()
    rows = [[f.name, _config_value(f.name, getattr(config, f.name)),
             _config_value(f.name, getattr(default, f.name))] for f in fields(config)]
    return _result([("key", TEXT), ("value", TEXT), ("default", TEXT)], rows, "SHOW")


MODEL_COLUMNS = (
    # Keys of runtime.models_info() entries, shown under the same names; absent keys are NULL.
    ("name", TEXT), ("kind", TEXT), ("engine", TEXT), ("device", TEXT), ("precision", TEXT),
    ("memory_bytes", INT8), ("loaded_at", TEXT), ("load_seconds", FLOAT8), ("batches", INT8), ("items", INT8),
)


def _show_models(snap: Snapshot) -> QueryResult:
    rows = [[_timestamp(field_of(m, key)) if key == "loaded_at" else field_of(m, key)
             for key, _ in MODEL_COLUMNS] for m in snap.models]
    return _result(MODEL_COLUMNS, rows, "SHOW")


HELP = (
    ("SHOW POOLS", "server connection pools per (database, user)"),
    ("SHOW CLIENTS", "client connections"),
    ("SHOW SERVERS", "server connections to the upstream, with each server's role, ban and lag"),
    ("SHOW STATS", "query, byte, error and wait-time counters"),
    ("SHOW CONFIG", "the running configuration (passwords hidden)"),
    ("SHOW MODELS", "models the runtime has loaded"),
    ("SHOW HELP", "this list"),
    ("RELOAD", "re-read the configuration file (as SIGHUP does)"),
)


def _show_help() -> QueryResult:
    return _result([("command", TEXT), ("description", TEXT)], HELP, "SHOW")


def _needs_arguments(fn: Callable[..., Any]) -> bool:
    params = inspect.signature(fn).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.default is p.empty and p.kind in positional for p in params)


async def _reload(server: Any) -> QueryResult:
    """Re-read the configuration as SIGHUP does; a bad one is an error and changes nothing.

    `server.load_config()` (set by proxy.main: the same file, environment and flags as at
    start) gives the new Config, which `server.reload(config)` applies. A server without
    `load_config` reloads itself with `server.reload()`.
    """
    loader = getattr(server, "load_config", None)
    if not callable(loader) and _needs_arguments(server.reload):
        raise FeatureNotSupported(
            "RELOAD is not available: this server cannot re-read its configuration by itself",
            hint="Send SIGHUP to the pgml-proxy process instead.",
        )
    try:
        if callable(loader):
            await _maybe_await(server.reload(await _maybe_await(loader())))
        else:
            await _maybe_await(server.reload())
    except PgError:
        raise
    except ValueError as exc:  # ConfigError: the old configuration stays in force
        raise InvalidParameterValue(f"RELOAD failed, configuration unchanged: {exc}") from None
    return QueryResult(None, [], "RELOAD")


_SNAPSHOT_VIEWS: dict[str, Callable[[Snapshot], QueryResult]] = {
    "POOLS": _show_pools,
    "CLIENTS": _show_clients,
    "SERVERS": _show_servers,
    "STATS": _show_stats,
    "MODELS": _show_models,
}


def _unknown(statement: str) -> PgError:
    commands = ", ".join(cmd for cmd, _ in HELP)
    return SyntaxError_(
        f"unknown admin command: {statement[:80]!r}", hint=f"The pgml_proxy database accepts: {commands}."
    )


Handler = Callable[[Any], Awaitable[QueryResult]]


def _plan(statement: str) -> Handler:
    """The handler for one admin statement; raises 42601 (with the list of commands) when unknown."""
    words = statement.upper().split()
    if words == ["RELOAD"]:
        return _reload
    if words and words[0] == "SET":  # drivers set session options on connect; nothing to keep here
        return _set
    if len(words) == 2 and words[0] == "SHOW":
        view = _SNAPSHOT_VIEWS.get(words[1])
        if view is not None:
            return lambda server: _from_snapshot(view, server)
        if words[1] == "CONFIG":
            return _async(_show_config)
        if words[1] == "HELP":
            return _async(lambda _server: _show_help())
    raise _unknown(statement)


async def _set(_server: Any) -> QueryResult:
    return QueryResult(None, [], "SET")


async def _from_snapshot(view: Callable[[Snapshot], QueryResult], server: Any) -> QueryResult:
    return view(await take_snapshot(server))


def _async(fn: Callable[[Any], QueryResult]) -> Handler:
    async def run(server: Any) -> QueryResult:
        return fn(server)

    return run


async def answer(sql: str, server: Any) -> list[QueryResult]:
    """The results of every statement in `sql` (split on ';'), in order.

    Every statement is checked before any runs, so a bad one (PgError 42601) leaves
    nothing half done. An empty query gives an empty list (answer EmptyQueryResponse).
    """
    handlers = [_plan(s) for s in (part.strip() for part in sql.split(";")) if s]
    return [await handler(server) for handler in handlers]
