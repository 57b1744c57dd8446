"""`ProxyServer`: the listening proxy and everything shared between its clients.

Owns the listening socket, the pools (one per database and user), the registry of
clients and their cancel keys (cancel routing), counters, `snapshot()` for the admin
console and metrics, the SIGHUP reload of pool settings and the SIGINT drain. It
holds the planner handler and hands it to client sessions; it knows no SQL itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.errors import TooManyConnections
from core.interfaces import StatementHandler
from proxy import tls
from proxy.backend import ServerConn, Target, parse_dsn, send_cancel
from proxy.config import Config
from proxy.pool import Pool, PoolSettings

if TYPE_CHECKING:
    from proxy.frontend import Frontend

log = logging.getLogger("pgml_proxy")


@dataclass
class Stats:
    """Counters since start: queries (Query + Execute messages), pgml ones, bytes, errors."""

    queries: int = 0
    pgml_queries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    clients_total: int = 0


@dataclass
class PoolInfo:
    database: str
    user: str
    mode: str
    size: int  # the configured bound
    active: int  # server connections attached to clients (or being opened)
    idle: int
    waiting: int  # clients waiting for a server connection


@dataclass
class ClientInfo:
    id: int
    addr: str
    database: str
    user: str
    application_name: str
    state: str  # "active" (has a server conn), "idle", "waiting", "startup"
    connected_at: float  # unix time


@dataclass
class ServerInfo:
    id: int
    database: str
    user: str
    state: str  # "active" (attached), "idle"
    backend_pid: int
    client_id: int | None


@dataclass
class ServerState:
    """A point-in-time view for the admin console and metrics.

    pools: per (database, user) pool its mode, bound, active/idle connections and
    waiting clients; clients: every connected client; servers: every open server
    connection and the client it serves; counters: `Stats` fields plus `wait_time`
    (seconds clients spent waiting for a pool, summed), `started_at` (unix time),
    `clients` and `servers` (current counts).
    """

    pools: list[PoolInfo] = field(default_factory=list)
    clients: list[ClientInfo] = field(default_factory=list)
    servers: list[ServerInfo] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)


class ProxyServer:
    ADMIN_DB = "pgml_proxy"

    def __init__(self, config: Config, upstream: str, handler: StatementHandler | None = None) -> None:
        self.config = config
        self.upstream_dsn = upstream
        self.target: Target = parse_dsn(upstream, config.upstream_sslmode)
        self.handler = handler
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: dict[int, Frontend] = {}
        self.stats = Stats()
        self.started_at = time.time()
        self.client_tls: ssl.SSLContext | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        # Set by proxy.main: re-reads the same file, environment and flags (admin RELOAD, SIGHUP).
        self.load_config: Callable[[], Config] | None = None
        # The runtime.Runtime serving this proxy (None without one), for SHOW MODELS and the like.
        self.runtime: Any = None
        self._load_tls()

    def _load_tls(self) -> None:
        self.client_tls = tls.client_context(self.config)

    def _upstream_ssl(self, mode: str) -> ssl.SSLContext | None:
        return tls.upstream_context(mode)

    # --- listening -----------------------------------------------------------------------
    async def start(self) -> None:
        from proxy.frontend import Frontend

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Frontend(self), self.config.listen_host, self.config.listen_port, reuse_address=True
        )
        self._reaper = loop.create_task(self._reap_idle())
        log.info("pgml-proxy listening on %s (pool_mode=%s)", self.address, self.config.pool_mode)

    @property
    def address(self) -> str:
        if self._server is None or not self._server.sockets:
            return self.config.listen
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.server_idle_timeout, 30.0))
            for pool in self.pools.values():
                pool.close_idle(self.config.server_idle_timeout)

    # --- clients and pools ---------------------------------------------------------------
    def forget(self, fe: Frontend) -> None:
        self.clients.pop(fe.id, None)

    def check_client_limit(self) -> None:
        if len(self.clients) > self.config.max_client_connections:
            raise TooManyConnections(
                "sorry, too many clients already "
                f"(max_client_connections={self.config.max_client_connections})"
            )

    def _settings(self) -> PoolSettings:
        c = self.config
        reset = c.server_reset_query if c.pool_mode == "session" else ""
        return PoolSettings(c.pool_size, c.pool_timeout, c.server_idle_timeout, reset, c.pool_mode)

    def pool_for(self, database: str, user: str) -> Pool:
        pool = self.pools.get((database, user))
        if pool is None:
            pool = Pool(database, user, self._password_for(user), self.target, self._settings(),
                        self._upstream_ssl)
            self.pools[(database, user)] = pool
        return pool

    def _password_for(self, user: str) -> str | None:
        """The upstream password: the DSN's for its user, else a plain one from `users`."""
        if user == self.target.user and self.target.password is not None:
            return self.target.password
        stored = self.config.users.get(user)
        if stored is not None and not stored.startswith(("md5", "SCRAM-SHA-256$")):
            return stored
        return self.target.password

    # --- cancel --------------------------------------------------------------------------
    def cancel(self, pid: int, secret: int) -> None:
        fe = self.clients.get(pid)
        if fe is None or fe.key != (pid, secret):
            log.info("cancel request with an unknown key ignored")
            return
        fe.cancel()

    async def cancel_backend(self, conn: ServerConn) -> None:
        await send_cancel(self.target, conn.pid, conn.secret)

    # --- lifecycle -----------------------------------------------------------------------
    def reload(self, config: Config) -> None:
        """Apply a new config's pool sizes, timeouts and users (listen/upstream need a restart)."""
        self.config = config
        settings = self._settings()
        for pool in self.pools.values():
            pool.settings = settings
            pool.password = self._password_for(pool.user) if pool.password is None else pool.password
        try:
            self._load_tls()
        except Exception as exc:
            log.error("TLS reload failed, keeping the old certificate: %s", exc)
        log.info("configuration reloaded")

    async def drain(self, timeout: float) -> None:
        """Stop listening; close clients as their transactions end; cut the rest after `timeout`."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            for fe in list(self.clients.values()):
                srv = fe.server
                if fe.task is None and (srv is None or (not srv.entries and srv.tx_status == "I")):
                    fe.write(_shutdown_error())
                    fe.close()
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for fe in list(self.clients.values()):
            fe.write(_shutdown_error())
            fe.close()
        await asyncio.sleep(0.05)
        for pool in self.pools.values():
            for conn in list(pool.busy) + list(pool.idle):
                conn.close()

    # --- observation ---------------------------------------------------------------------
    def snapshot(self) -> ServerState:
        snap = ServerState()
        for (db, user), pool in self.pools.items():
            snap.pools.append(PoolInfo(db, user, pool.settings.mode, pool.settings.size,
                                       len(pool.busy) + pool.connecting, len(pool.idle), len(pool.waiters)))
            for conn in pool.busy:
                fe = conn.client
                snap.servers.append(ServerInfo(conn.id, db, user, "active", conn.pid,
                                               getattr(fe, "id", None)))
            for conn in pool.idle:
                snap.servers.append(ServerInfo(conn.id, db, user, "idle", conn.pid, None))
        for fe in self.clients.values():
            state = "startup" if fe.state != "ready" else "active" if fe.server is not None else "idle"
            snap.clients.append(ClientInfo(fe.id, fe.addr, fe.database, fe.user, fe.application_name,
                                           state, fe.connected_at))
        s = self.stats
        snap.counters = {
            "queries": s.queries, "pgml_queries": s.pgml_queries, "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out, "errors": s.errors, "clients_total": s.clients_total,
            "wait_time": sum(p.wait_time for p in self.pools.values()), "started_at": self.started_at,
            "clients": len(self.clients), "servers": len(snap.servers),
        }
        return snap


def _shutdown_error() -> bytes:
    from proxy import messages as m

    return m.error_message({"S": "FATAL", "V": "FATAL", "C": "57P01",
                            "M": "terminating connection due to administrator command "
                                 "(pgml-proxy shutting down)"})
