"""The upstream servers and their health: roles, lag, bans, failover, and which serves a route.

Owns the list of upstream servers (`Node`: the configured upstream and every replica), a
periodic health check of each on a connection of its own (`pg_is_in_recovery()` and its
WAL position), the roles found from it (so hosts may be listed in any order, and a standby
promoted by `pg_ctl promote` or any other tool becomes the primary at the next check, with
no restart), bans (a replica that fails a check, refuses a connection or lags more than
`max_replica_lag` bytes of WAL is banned for `ban_time`, and comes back once healthy), and
`choose`: the server for a route (proxy.routing's Dest), with read-your-writes (a replica
serves a client's reads only once its replayed LSN has reached the client's last commit)
and load balancing. It opens no client pools (app.py keeps one per database, user, server)
and classifies no SQL (proxy/routing.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import ConnectionFailure, InvalidParameterValue, PgError
from proxy import messages as m
from proxy import routing
from proxy.backend import ServerConn, Target, connect, parse_dsn
from proxy.routing import Dest

if TYPE_CHECKING:
    from proxy.app import ProxyServer
    from proxy.frontend import Frontend
    from proxy.pool import Pool

log = logging.getLogger("pgml_proxy.replicas")

# Read after a transaction that may have written: the insert position is at or past the end of
# its commit record (the write position may lag behind it under synchronous_commit = off).
LSN_SQL = "SELECT pg_catalog.pg_current_wal_insert_lsn()"
CHECK_SQL = (
    "SELECT pg_catalog.pg_is_in_recovery(), CASE WHEN pg_catalog.pg_is_in_recovery() "
    "THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_insert_lsn() END"
)


def server_key(target: Target) -> str:
    return f"{target.host}:{target.port}"


def parse_lsn(text: str) -> int:
    """A pg_lsn's text ('16/B374D848') as a byte position."""
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass(eq=False)
class Node:
    """One upstream server and what its latest health check found."""

    target: Target
    weight: int = 1
    role: str = "unknown"  # primary | replica | down | unknown (before the first check)
    lsn: int | None = None  # primary: its insert LSN; replica: its replayed LSN
    lag: int | None = None  # replica: bytes of WAL behind the primary
    banned_until: float = 0.0  # time.monotonic()
    ban_reason: str = ""
    error: str = ""
    checked_at: float = 0.0  # unix time of the last check
    conn: ServerConn | None = None  # the health check's own connection
    key: str = field(init=False)  # "host:port": its pools' key

    def __post_init__(self) -> None:
        self.key = server_key(self.target)

    def banned(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.banned_until


class Upstreams:
    """Every upstream server; `primary` is the one that last said it is not in recovery."""

    def __init__(self, primary: Target, replicas: Sequence[tuple[Target, int]], *, interval: float,
                 timeout: float, max_lag: int, ban_time: float, balancing: str, primary_reads: bool,
                 ssl_context: Callable[[str], ssl.SSLContext | None] | None = None) -> None:
        self.nodes = [Node(primary, role="primary"), *(Node(t, w) for t, w in replicas)]
        self.primary = self.nodes[0]
        self.interval, self.timeout, self.max_lag, self.ban_time = interval, timeout, max_lag, ban_time
        self.balancing, self.primary_reads = balancing, primary_reads
        self._ssl = ssl_context
        self._turn = 0
        self._task: asyncio.Task[None] | None = None

    # --- the health checks -------------------------------------------------------------------
    async def start(self) -> None:
        """One round of checks (so the first clients are routed by what the servers say), then
        a check every `interval` seconds in the background."""
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for node in self.nodes:
            if node.conn is not None:
                node.conn.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # a bug here must not end the checks
                log.exception("health check round failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(node) for node in self.nodes))
        self._find_primary()
        now = time.monotonic()
        head = self.primary.lsn if self.primary.role == "primary" else None
        for node in self.nodes:
            if node is self.primary:
                continue
            if node.role == "replica":
                node.lag = None if head is None or node.lsn is None else max(head - node.lsn, 0)
                if node.lag is not None and node.lag > self.max_lag:
                    self.ban(node, f"lags {node.lag} bytes of WAL (max_replica_lag = {self.max_lag})", now)
            elif node.role == "down":
                self.ban(node, f"health check failed: {node.error}", now)
            else:  # a second primary (an old one back, a split brain): never a reader
                node.lag = None

    def _find_primary(self) -> None:
        if self.primary.role == "primary":
            return
        for node in self.nodes:
            if node.role == "primary":
                log.warning("primary is now %s (was %s: %s)", node.key, self.primary.key,
                            self.primary.error or self.primary.role)
                self.primary = node
                node.banned_until, node.ban_reason = 0.0, ""
                return

    async def _check(self, node: Node) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                if node.conn is None or node.conn.closed:
                    t = node.target
                    node.conn = await connect(t, t.database, t.user, t.password, self._ssl,
                                              timeout=self.timeout)
                    node.conn.internal = True  # its responses are the checker's, never relayed
                node.conn.inbox.clear()  # what the server said unasked since (a notice)
                row = (await node.conn.run_simple(CHECK_SQL))[0].rows[0]
        except (PgError, OSError, TimeoutError, ConnectionFailure, IndexError) as exc:
            if node.conn is not None:
                node.conn.close()
                node.conn = None
            if node.role != "down":
                log.warning("upstream %s is down: %s", node.key, exc or "timeout")
            node.role, node.error, node.lsn, node.lag = "down", str(exc) or "timeout", None, None
        else:
            node.role = "replica" if row[0] == b"t" else "primary"
            node.lsn = parse_lsn(row[1].decode()) if row[1] is not None else None
            node.error = ""
            if node.banned_until and not node.banned() and node.ban_reason:
                log.info("upstream %s is back (%s)", node.key, node.role)
                node.ban_reason = ""
        node.checked_at = time.time()

    def ban(self, node: Node, reason: str, now: float | None = None) -> None:
        """Take `node` out of the readers for `ban_time` (the primary is never banned)."""
        if node is self.primary:
            return
        if not node.banned(now):
            log.warning("upstream %s banned for %.0f s: %s", node.key, self.ban_time, reason)
        node.banned_until = (time.monotonic() if now is None else now) + self.ban_time
        node.ban_reason = reason

    # --- routing -----------------------------------------------------------------------------
    def node_of(self, target: Target) -> Node | None:
        return next((n for n in self.nodes if n.target == target), None)

    def choose(self, dest: Dest, min_lsn: int, load: Callable[[Node], int]) -> Node:
        """The server for `dest`: the primary, or a healthy, unbanned replica that has replayed
        up to `min_lsn` (0: any), balanced; the primary when none is."""
        if dest is Dest.PRIMARY:
            return self.primary
        now = time.monotonic()
        primary = self.primary
        readers = [n for n in self.nodes if n.role == "replica" and n is not primary
                   and n.banned_until <= now and (min_lsn <= 0 or (n.lsn or 0) >= min_lsn)]
        if self.primary_reads or not readers:
            readers.append(self.primary)
        return readers[0] if len(readers) == 1 else self._balance(readers, load)

    def _balance(self, nodes: list[Node], load: Callable[[Node], int]) -> Node:
        self._turn += 1
        if self.balancing == "random":
            return random.choices(nodes, weights=[n.weight for n in nodes])[0]
        if self.balancing == "least_connections":
            start = self._turn % len(nodes)  # ties go round the list, not always to the first
            turned = nodes[start:] + nodes[:start]
            return min(turned, key=lambda n: load(n) / n.weight)
        slot = self._turn % sum(n.weight for n in nodes)  # weighted round-robin
        for node in nodes:
            if slot < node.weight:
                return node
            slot -= node.weight
        return nodes[-1]


class ClientRoute:
    """One client's routing (transaction pooling): its `pgml_proxy.route`, the SQL that starts
    its next transaction, and the LSN its reads must see (read-your-writes).

    The frontend tells it each Query, Parse, Bind and Close (`query`, `extended`), asks it for
    the pool when a transaction needs a server (`pool`), for another when a replica cannot be
    reached (`failed`), and whether to read the primary's LSN as a transaction ends (`lsn_owed`).
    """

    def __init__(self, app: ProxyServer) -> None:
        self.app = app
        self.setting = "auto"
        self.sql = ""  # the statement that will start the next transaction
        self.stmts: dict[str, str] = {}  # prepared statement name -> its SQL
        self.min_lsn = 0  # the primary's LSN after this client's last write
        self.lsn_owed = False

    def query(self, fe: Frontend, msg: bytes) -> bool:
        """A simple Query; True when it was `SET pgml_proxy.route`, answered here."""
        if fe.server is not None and b"pgml_proxy" not in msg:
            return False  # inside a transaction, whose server is chosen: nothing to decode
        sql = m.Query.parse(msg[5:]).sql
        value = routing.route_setting(sql)
        if value is None:
            self.sql = sql
            return False
        status = fe.server.tx_status if fe.server is not None else "I"
        if value.lower() in routing.ROUTE_VALUES:
            self.setting = value.lower()
            fe.reply(m.CommandComplete("RESET" if sql.lstrip()[:1] in "rR" else "SET").encode()
                     + m.ReadyForQuery(status).encode())
            return True
        exc = InvalidParameterValue(
            f'invalid value for parameter "{routing.ROUTE_SETTING}": "{value}"',
            hint=f"Available values: {', '.join(routing.ROUTE_VALUES)}.")
        fe.app.stats.errors += 1
        fe.reply(m.error_message(exc.fields) + m.ReadyForQuery(status).encode())
        return True

    def extended(self, t: int, msg: bytes) -> None:
        """A Parse names a statement's SQL, a Bind says which will run, a Close forgets one."""
        if t == 0x50:
            p = m.Parse.parse(msg[5:])
            self.stmts[p.name] = self.sql = p.sql
        elif t == 0x42:
            r = m.Reader(msg[5:])
            r.cstr()  # the portal
            self.sql = self.stmts.get(r.cstr(), "")  # unknown: the primary
        elif t == 0x43 and msg[5:6] == b"S":
            self.stmts.pop(m.Reader(msg[6:]).cstr(), None)

    def pool(self, fe: Frontend) -> Pool:
        """The pool for the transaction `self.sql` starts."""
        ups = self.app.upstreams
        assert ups is not None
        dest, explicit = routing.route(self.sql, self.setting)
        if dest is Dest.REPLICA and self._needs_temp(self.sql):
            dest = Dest.PRIMARY
        # An explicit replica route (the setting, a comment hint) reads there, even if stale.
        ryw = self.app.config.read_your_writes and not explicit
        node = ups.choose(dest, self.min_lsn if ryw else 0, self.app.node_load)
        self.lsn_owed = self.app.config.read_your_writes and dest is Dest.PRIMARY and self.setting == "auto"
        return self.app.pool_for(fe.database, fe.user, node)

    def _needs_temp(self, sql: str) -> bool:
        """Whether the planner materialises a pgml call of `sql` in temporary tables, which a
        standby cannot create (its plans are cached: asked once per text)."""
        plans = getattr(self.app.handler, "plans", None)
        if plans is None or "pgml" not in sql.lower():
            return False
        try:
            return any(getattr(p, "needs_temp", False) for p in plans(sql))
        except PgError:
            return False  # the statement fails wherever it goes: the replica says why


    def failed(self, fe: Frontend, pool: Pool, exc: PgError) -> Pool | None:
        """No connection to `pool`'s server: a replica is banned and the pool to try instead
        given; None for the primary (the client gets the error; the checks find a new one)."""
        ups = self.app.upstreams
        node = ups.node_of(pool.target) if ups is not None else None
        if ups is None or node is None or node is ups.primary:
            return None
        ups.ban(node, f"connection failed: {exc}")
        other = self.pool(fe)
        return None if other is pool else other

    def lsn_read(self, rows: list[bytes]) -> None:
        """The primary's LSN after this client's write (LSN_SQL's row, none if it failed)."""
        for body in rows:
            value = m.DataRow.parse(body).values[0]
            if value is not None:
                self.min_lsn = max(self.min_lsn, parse_lsn(bytes(value).decode()))


def replica_targets(dsns: Sequence[str], weights: Sequence[int], sslmode: str) -> list[tuple[Target, int]]:
    return [(parse_dsn(dsn, sslmode), weights[i] if i < len(weights) else 1) for i, dsn in enumerate(dsns)]


def runtime_dsn(primary: str, replicas: Sequence[str]) -> str:
    """The runtime's own DSN: every server, `target_session_attrs=read-write`, so libpq (and
    psycopg_pool's reconnects) finds whichever is the primary now: registry writes and the
    LISTEN for deploys (NOTIFY is not replicated) follow a failover."""
    if not replicas:
        return primary
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    base = conninfo_to_dict(primary)
    hosts, ports = [], []
    for dsn in (primary, *replicas):
        d = conninfo_to_dict(dsn)
        hosts.append(str(d.get("host") or "/tmp"))
        ports.append(str(d.get("port") or 5432))
    base.update(host=",".join(hosts), port=",".join(ports), target_session_attrs="read-write")
    base.pop("hostaddr", None)
    return make_conninfo("", **base)
