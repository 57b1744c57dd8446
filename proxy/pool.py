"""Bounded pools of server connections, one per (database, user).

Owns how many server connections exist, who waits for one (FIFO, with a deadline:
an exhausted pool answers SQLSTATE 53300, never a hang), resetting a connection
before it is reused (`server_reset_query` in session mode) and closing idle ones.
It does not know clients: frontend.py decides *when* a connection goes back.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from core.errors import PgError, TooManyConnections
from proxy.backend import ServerConn, Startup, Target, connect

log = logging.getLogger("pgml_proxy.pool")
# How long a vanished client's server connection may take to come back clean (Sync answered,
# ROLLBACK and reset done) before it is closed instead of reused.
FINISH_TIMEOUT = 5.0


@dataclass
class PoolSettings:
    size: int
    timeout: float
    idle_timeout: float
    reset_query: str
    mode: str


@dataclass
class Pool:
    database: str
    user: str
    password: str | None
    target: Target
    settings: PoolSettings
    ssl_context: Callable[[str], ssl.SSLContext | None] | None = None
    idle: deque[ServerConn] = field(default_factory=deque)
    busy: set[ServerConn] = field(default_factory=set)
    waiters: deque[asyncio.Future[ServerConn | None]] = field(default_factory=deque)
    connecting: int = 0
    # The reported settings of a fresh connection: what a new client starts from.
    defaults: dict[str, str] = field(default_factory=dict)
    wait_time: float = 0.0  # seconds clients spent waiting, summed

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.busy) + self.connecting

    def try_acquire(self, startup: Startup = ()) -> ServerConn | None:
        """An idle connection opened with `startup` right now, or None (then await `acquire`)."""
        idle = self.idle
        if idle:  # the usual case: the warmest connection fits (no search, no removal from the middle)
            conn = idle[-1]
            if conn.startup == startup and not conn.closed:
                idle.pop()
                self.busy.add(conn)
                return conn
        for conn in reversed(idle):  # LIFO: the warmest connection
            if conn.startup == startup and not conn.closed:
                self.idle.remove(conn)
                self.busy.add(conn)
                return conn
        self.idle = deque(c for c in self.idle if not c.closed)
        return None

    async def acquire(self, password: str | None = None, startup: Startup = ()) -> ServerConn:
        """A server connection opened with the startup parameters `startup` (session mode: the
        client's own, so RESET returns to them); raises TooManyConnections after `timeout`,
        PgError from login.

        `password` (passthrough auth): unless it is the one already proven upstream, the
        upstream checks it on a fresh login before any pooled connection is handed out.
        """
        if password is not None and password != self.password:
            conn = await self._open(password, startup)
            self.password = password
            return conn
        idle = self.try_acquire(startup)
        if idle is not None:
            return idle
        start = time.monotonic()
        while True:
            if self.total >= self.settings.size and self.idle:
                self.idle.popleft().close()  # the coldest idle one, opened for other parameters
            if self.total < self.settings.size:
                return await self._open(None, startup)
            fut: asyncio.Future[ServerConn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            left = self.settings.timeout - (time.monotonic() - start)
            try:
                got = await asyncio.wait_for(fut, max(left, 0.001))
            except TimeoutError:
                self.wait_time += time.monotonic() - start
                raise TooManyConnections(
                    f"no server connection free for database {self.database!r} user {self.user!r} "
                    f"within pool_timeout={self.settings.timeout}s (pool_size={self.settings.size})",
                    hint="raise pool_size or pool_timeout, or use pool_mode=transaction",
                    fields={"S": "ERROR", "V": "ERROR"},
                ) from None
            finally:
                if fut in self.waiters:
                    self.waiters.remove(fut)
            self.wait_time += time.monotonic() - start
            if got is not None and not got.closed:
                if got.startup == startup:
                    self.busy.add(got)
                    return got
                got.close()  # its slot is ours, but not with these parameters

    async def _open(self, password: str | None = None, startup: Startup = ()) -> ServerConn:
        self.connecting += 1
        try:
            conn = await connect(self.target, self.database, self.user, password or self.password,
                                 self.ssl_context, startup=startup)
        except BaseException:
            self.connecting -= 1
            self._wake_one(None)
            raise
        self.connecting -= 1
        if not self.defaults:
            self.defaults = dict(conn.params)
        self.busy.add(conn)
        return conn

    def _wake_one(self, conn: ServerConn | None) -> bool:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def release(self, conn: ServerConn) -> None:
        """Take back a connection that is idle and clean (or closed: its slot frees up)."""
        self.busy.discard(conn)
        conn.client = None
        replies = conn.replies
        if conn.closed or replies.tx_status != "I" or replies.queue:
            conn.close()
            self._wake_one(None)
            return
        conn.used_at = time.monotonic()
        if not self.waiters or not self._wake_one(conn):
            self.idle.append(conn)

    async def reset_and_release(self, conn: ServerConn, sync_owed: bool = False) -> None:
        """Finish what a vanished client left (Sync, ROLLBACK), reset in session mode, give back.

        `sync_owed`: the client sent extended-protocol messages and no Sync, so the upstream
        may be skipping input until one (after an error) and would ignore the reset. The
        whole exchange is bounded: a connection that does not come back clean is closed.
        """
        conn.client = None
        conn.internal = True
        conn.replies.clear()
        conn.inbox.clear()
        try:
            async with asyncio.timeout(FINISH_TIMEOUT):
                await self._finish(conn, sync_owed)
        except (PgError, OSError, TimeoutError) as exc:
            log.warning("server conn %d reset failed, closing it: %s", conn.id, exc or "timeout")
            conn.close()
        conn.internal = False
        self.release(conn)

    async def _finish(self, conn: ServerConn, sync_owed: bool) -> None:
        if sync_owed:
            await conn.sync()
        if conn.tx_status != "I":
            await conn.run_simple("ROLLBACK")
        if self.settings.reset_query:
            await conn.run_simple(self.settings.reset_query)
            conn.txs.reset()
            conn.extra.clear()
            conn.unnamed = None
            conn.applied = None

    def discard(self, conn: ServerConn) -> None:
        conn.close()
        self.release(conn)

    def close_idle(self, older_than: float | None = None) -> None:
        now = time.monotonic()
        keep: deque[ServerConn] = deque()
        for conn in self.idle:
            if older_than is None or now - conn.used_at > older_than:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep
