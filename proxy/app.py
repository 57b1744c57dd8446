"""`ProxyServer`: the listening proxy and everything shared between its clients.

Owns the listening socket, the pools (one per database, user and upstream server; the
servers and their health are proxy/replicas.py's `Upstreams` when replicas are configured), the registry of
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
from core.interfaces import NowStatement, StatementHandler
from proxy import tls
from proxy.backend import ServerConn, Target, parse_dsn, send_cancel
from proxy.config import Config
from proxy.localexec import NowBatch
from proxy.pool import Pool, PoolSettings
from proxy.replicas import Node, Upstreams, replica_targets, server_key
from proxy.routing import Dest
from proxy.session import Phase

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
    # The upstream server it is connected to and what its last health check said of that server.
    server: str = ""
    role: str = ""
    banned: bool | None = None
    lag_bytes: int | None = None


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
        # Query messages the planner's fast path answered, with its statement and RowDescription
        # (LocalStatements.answered_again): the same bytes again need no parsing or planning.
        self.express: dict[bytes, tuple[NowStatement, bytes]] = {}
        self.now_batch = NowBatch(lambda: self.handler)  # those answered again, per loop turn
        self.pools: dict[tuple[str, str, str], Pool] = {}  # (database, user, server "host:port")
        self.upstreams: Upstreams | None = None
        if config.replicas:
            c = config
            self.upstreams = Upstreams(
                self.target, replica_targets(c.replicas, c.weights, c.upstream_sslmode),
                interval=c.health_check_interval, timeout=c.health_check_timeout,
                max_lag=c.max_replica_lag, ban_time=c.ban_time, balancing=c.load_balancing,
                primary_reads=c.primary_reads, ssl_context=self._upstream_ssl)
        self.clients: dict[int, Frontend] = {}
        self.cancel_keys: dict[tuple[int, int], Frontend] = {}
        self._settings_keys: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
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
        if self.upstreams is not None:
            await self.upstreams.start()
        self._server = await loop.create_server(
            lambda: Frontend(self), self.config.listen_host, self.config.listen_port, reuse_address=True,
            reuse_port=self.config.reuse_port or None,
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
            for pool in list(self.pools.values()):
                pool.close_idle(self.config.server_idle_timeout)
                self.drop_if_unused(pool)

    def drop_if_unused(self, pool: Pool) -> None:
        """Forget a pool with no connections, no waiters and no client (a failed login's, an old one)."""
        if pool.total or pool.waiters or any(fe.pool is pool for fe in self.clients.values()):
            return
        key = (pool.database, pool.user, server_key(pool.target))
        if self.pools.get(key) is pool:
            del self.pools[key]

    # --- clients and pools ---------------------------------------------------------------
    def forget(self, fe: Frontend) -> None:
        self.clients.pop(fe.id, None)
        if self.cancel_keys.get(fe.key) is fe:
            del self.cancel_keys[fe.key]

    def settings_key(self, want: dict[str, str]) -> tuple[tuple[str, str], ...]:
        """One shared tuple per distinct set of client settings (see Frontend.want_key)."""
        key = tuple(sorted(want.items()))
        shared = self._settings_keys.setdefault(key, key)
        if len(self._settings_keys) > 4096:  # distinct application_names and the like: bounded
            self._settings_keys.clear()
        return shared

    def register_key(self, fe: Frontend) -> None:
        """The BackendKeyData `fe` was given: a CancelRequest with it reaches `fe`."""
        self.cancel_keys[fe.key] = fe

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

    @property
    def primary(self) -> Target:
        """Where writes go now: the configured upstream, or the server promoted since."""
        return self.upstreams.primary.target if self.upstreams is not None else self.target

    def pool_for(self, database: str, user: str, node: Node | None = None) -> Pool:
        """The pool of `database` and `user` on `node` (None: the primary)."""
        if node is None and self.upstreams is not None:
            node = self.upstreams.primary
        target, key = (node.target, node.key) if node is not None else (self.target, server_key(self.target))
        pool = self.pools.get((database, user, key))
        if pool is None:
            pool = Pool(database, user, self._password_for(user), target, self._settings(),
                        self._upstream_ssl)
            self.pools[(database, user, key)] = pool
        return pool

    def session_node(self) -> Node | None:
        """Session pooling, a client that asked for a replica: the replica for its session."""
        if self.upstreams is None:
            return None
        return self.upstreams.choose(Dest.REPLICA, 0, self.node_load)

    def node_load(self, node: Node) -> int:
        """Server connections in use on `node`, over every pool (least-connections balancing)."""
        key = node.key
        return sum(len(p.busy) + p.connecting for (_, _, k), p in self.pools.items() if k == key)

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
        fe = self.cancel_keys.get((pid, secret))
        if fe is None:
            log.info("cancel request with an unknown key ignored")
            return
        fe.cancel()

    async def cancel_backend(self, conn: ServerConn) -> None:
        await send_cancel(conn.target or self.target, conn.pid, conn.secret)

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
                if fe.task is None and (srv is None or (not srv.replies and srv.tx_status == "I")):
                    fe.write(_shutdown_error())
                    fe.close()
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        if self.upstreams is not None:
            await self.upstreams.close()
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
        nodes = {n.key: n for n in self.upstreams.nodes} if self.upstreams is not None else {}
        for (db, user, key), pool in self.pools.items():
            snap.pools.append(PoolInfo(db, user, pool.settings.mode, pool.settings.size,
                                       len(pool.busy) + pool.connecting, len(pool.idle), len(pool.waiters)))
            health = _health(nodes.get(key), key)
            for conn in pool.busy:
                fe = conn.client
                snap.servers.append(ServerInfo(conn.id, db, user, "active", conn.pid,
                                               getattr(fe, "id", None), *health))
            for conn in pool.idle:
                snap.servers.append(ServerInfo(conn.id, db, user, "idle", conn.pid, None, *health))
        for node in nodes.values():  # each server's health-check connection: its state is its role
            hc = node.conn
            snap.servers.append(ServerInfo(hc.id if hc else 0, node.target.database, node.target.user,
                                           "health", hc.pid if hc else 0, None, *_health(node, node.key)))
        for fe in self.clients.values():
            ready = fe.s.phase is Phase.READY
            state = "startup" if not ready else "active" if fe.server is not None else "idle"
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


def _health(node: Node | None, key: str) -> tuple[str, str, bool | None, int | None]:
    """(server, role, banned, lag) of a server for SHOW SERVERS; no checks without replicas."""
    if node is None:
        return key, "", None, None
    return key, node.role, node.banned(), node.lag


def _shutdown_error() -> bytes:
    from proxy import messages as m

    return m.error_message({"S": "FATAL", "V": "FATAL", "C": "57P01",
                            "M": "terminating connection due to administrator command "
                                 "(pgml-proxy shutting down)"})
