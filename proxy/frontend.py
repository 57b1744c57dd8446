"""One client session: the proxy playing the server to a driver.

Owns the client's state machine (startup, TLS, authentication, ready; the extended-
query batch and its skip-to-Sync after an error; COPY), the decision of which server
connection serves the client and when it goes back to the pool (ReadyForQuery 'I' in
transaction mode, disconnect in session mode), the replay of session settings and
named prepared statements onto whichever server connection runs them, and the hook
that hands statements mentioning pgml to the planner. Messages that need no rewriting
are relayed as the client sent them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from core.errors import (
    InternalError,
    PgError,
    ProtocolViolation,
    TooManyConnections,
)
from core.interfaces import CallContext
from proxy import messages as m
from proxy.backend import (
    SWALLOW_ALL,
    SWALLOW_NONE,
    SWALLOW_OK,
    Expect,
    ServerConn,
    settings_sql,
)
from proxy.localexec import LocalStatements
from proxy.sink import ClientSink
from proxy.startup import UNSETTABLE, startup_bytes

if TYPE_CHECKING:
    from proxy.app import ProxyServer
    from proxy.pool import Pool

log = logging.getLogger("pgml_proxy.frontend")
_ids = itertools.count(1)
_PGML = re.compile(rb"[pP][gG][mM][lL]")
_DEALLOCATE = re.compile(rb"(?i)\b(deallocate|discard)\b")
_EXTENDED = frozenset(b"PBDECH")
Step = Coroutine[Any, Any, None] | None


def _fatal(exc: PgError) -> bytes:
    fields = exc.fields
    fields["S"] = fields["V"] = "FATAL"
    return m.error_message(fields)


class Frontend(asyncio.Protocol):
    """A client connection. Callbacks frame and route; anything that must wait runs in `task`."""

    def __init__(self, app: ProxyServer) -> None:
        self.app = app
        self.id = next(_ids)
        self.key = (self.id, secrets.randbits(31))
        self.transport: asyncio.Transport | None = None
        self.addr = ""
        self.framer = m.Framer(app.config.max_message_size)
        self.state = "startup"
        self.startup_buf = bytearray()
        self.database = self.user = self.application_name = ""
        self.connected_at = time.time()
        self.tx = app.config.pool_mode == "transaction"
        self.pool: Pool | None = None
        self.server: ServerConn | None = None
        self.admin = False
        self.want: dict[str, str] = {}
        self.pending: deque[tuple[int, bytes]] = deque()
        self.auth_queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.up: list[bytes] = []
        self.batch = 0
        self.failed_batch = -1
        self.batch_forwarded = False
        self.stmts: dict[str, tuple[str, bytes]] = {}
        self.unnamed: bytes | None = None
        self.local = LocalStatements(self)
        self.holding = False
        self.copying = False

    # --- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.app.clients[self.id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self.app.forget(self)
        if self.task is not None:
            self.task.cancel()
        self.local.cancel()
        srv, self.server = self.server, None
        if srv is not None and self.pool is not None:
            srv.client = None
            if srv.entries or self.holding or srv.internal:
                # It was busy for this client: stop its query and do not reuse it.
                self.app.spawn(self.app.cancel_backend(srv))
                self.pool.discard(srv)
            elif not self.tx or srv.tx_status != "I":
                self.app.spawn(self.pool.reset_and_release(srv))
            else:
                self.pool.release(srv)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.app.stats.bytes_in += len(data)
        try:
            if self.state == "startup":
                startup_bytes(self, data)
                return
            fr = self.framer
            # Nothing left over (the usual case): read the messages straight out of `data`.
            buf: bytes | bytearray = data
            if fr.buf:
                fr.feed(data)
                buf = fr.buf
            msgs, used = m.scan(buf, fr.max_size)
            for t, s, e in msgs:
                msg = bytes(buf[s:e])  # no copy when `data` is exactly one message
                if self.state == "auth":
                    self.auth_queue.put_nowait((t, msg[5:]))
                elif self.state == "ready":
                    self._handle(t, msg)
            if buf is data:
                if used < len(data):
                    fr.feed(data[used:])
            else:
                fr.drop(used)
        except PgError as exc:  # a protocol violation, or a startup packet we cannot serve
            self.fatal(exc)
        except Exception as exc:  # a bug here must cost one client, never the proxy
            log.exception("client %d: unexpected failure", self.id)
            self.fatal(InternalError(f"pgml-proxy internal error: {exc}"))
        self.flush_up()

    # --- writing -------------------------------------------------------------------------
    def write(self, data: bytes | bytearray) -> None:
        if self.transport is not None and self.state != "closed":
            self.app.stats.bytes_out += len(data)
            self.transport.write(data)

    def reply(self, data: bytes) -> None:
        """Send a response of our own, after whatever the upstream still owes the client."""
        srv = self.server
        if srv is not None and srv.entries:
            srv.expect(Expect(b"", self.batch, synthetic=data))
        else:
            self.write(data)

    def flush_up(self) -> None:
        if self.up:
            data = b"".join(self.up)
            self.up.clear()
            if self.server is not None:
                self.server.send(data)

    def fatal(self, exc: PgError) -> None:
        self.app.stats.errors += 1
        self.write(_fatal(exc))
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def ready(self) -> None:
        """Login is done: what the client already sent is handled next, in order."""
        self.state = "ready"
        while not self.auth_queue.empty():
            self.pending.append(self.auth_queue.get_nowait())
        msgs, used = self.framer.scan()
        self.pending.extend((t, bytes(self.framer.buf[s:e])) for t, s, e in msgs)
        self.framer.drop(used)
        self.app.stats.clients_total += 1

    # --- task plumbing -------------------------------------------------------------------
    def start_task(self, step: Coroutine[Any, Any, None]) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(step))

    async def _run(self, step: Coroutine[Any, Any, None] | None) -> None:
        try:
            if step is not None:
                await step
            while self.pending and self.state == "ready":
                t, msg = self.pending.popleft()
                nxt = self._dispatch(t, msg)
                if nxt is not None:
                    self.flush_up()
                    await nxt
            # One write for everything queued meanwhile (Parse/Bind/Describe/Execute/Sync after
            # a server was acquired), not one per message: the syscall is the proxy's main cost.
            self.flush_up()
        except PgError as exc:
            self.fatal(exc)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.exception("client %d failed", self.id)
            self.fatal(InternalError(f"pgml-proxy internal error: {exc}"))
        finally:
            self.task = None
        if self.pending and self.state == "ready":
            self.start_task(self._noop())

    async def _noop(self) -> None:
        return None

    def _handle(self, t: int, msg: bytes) -> None:
        if self.task is not None:
            self.pending.append((t, msg))
            return
        step = self._dispatch(t, msg)
        if step is not None:
            self.flush_up()
            self.start_task(step)

    # --- routing -------------------------------------------------------------------------
    def _dispatch(self, t: int, msg: bytes) -> Step:
        """Route one client message; returns a coroutine when it must wait for something."""
        if t == 0x51:  # Query
            self.app.stats.queries += 1
            self.local.note_sql(msg, parse=False)  # statement_timeout may change
            if self.admin:
                return self.local.admin_query(m.Query.parse(msg[5:]).sql)
            if _PGML.search(msg, 5) is not None:
                return self.local.simple_query(m.Query.parse(msg[5:]).sql)
            self.unnamed = None
            step = self._forward(t, msg, b"Z")
            srv = self.server
            if srv is not None:
                srv.unnamed = None  # a simple Query drops the unnamed statement upstream
                if self.tx and _DEALLOCATE.search(msg, 5) is not None:
                    # DEALLOCATE ALL / DISCARD ALL (psycopg sends one after DDL) empties the server's
                    # statements, ours included: they are prepared again when next bound.
                    srv.prepared.clear()
            return step
        if t in _EXTENDED:
            if self.failed_batch == self.batch and t != 0x48:
                return None  # skipping to Sync after an error
            if self.admin:
                return self.local.refuse_extended(t)
            return self._extended(t, msg)
        if t == 0x53:  # Sync
            return self._sync()
        if t in (0x64, 0x63, 0x66):  # CopyData, CopyDone, CopyFail: the server conn is ours
            if self.server is not None:
                self.up.append(msg)
            return None
        if t == 0x58:  # Terminate
            self.state = "closing"
            self.close()
            return None
        raise ProtocolViolation(f"invalid frontend message type {t} ({chr(t)!r})")

    def _server_now(self) -> ServerConn | None:
        if self.server is not None:
            return self.server
        assert self.pool is not None
        conn = self.pool.try_acquire()
        if conn is not None:
            self._attach(conn)
        return conn

    def _attach(self, conn: ServerConn) -> None:
        conn.client = self
        conn.internal = False
        self.server = conn
        if conn.last_client is not self:
            self._replay_settings(conn)
            conn.last_client = self

    def _replay_settings(self, conn: ServerConn) -> None:
        """Make `conn` carry this client's settings, before anything of the client runs on it."""
        changes: dict[str, str | None] = {}
        for k, v in self.want.items():
            if conn.params.get(k, conn.extra.get(k)) != v:
                changes[k] = v
        for k in list(conn.extra):
            if k not in self.want:
                changes[k] = None
                del conn.extra[k]
        if not changes:
            return
        for k, val in changes.items():
            if k not in conn.params and val is not None:
                conn.extra[k] = val
        self.up.append(m.Query(settings_sql(changes)).encode())
        conn.unnamed = None
        conn.expect(Expect(b"Z", self.batch, SWALLOW_ALL))

    async def acquire(self) -> ServerConn:
        """A server connection for this client, waiting for the pool when it must."""
        if self.server is not None:
            return self.server
        assert self.pool is not None
        conn = await self.pool.acquire()
        if self.state == "closed":
            self.pool.release(conn)
            raise asyncio.CancelledError()
        self._attach(conn)
        self.flush_up()
        return conn

    def _forward(self, t: int, msg: bytes, terminals: bytes) -> Step:
        srv = self._server_now()
        if srv is None:
            return self._forward_later(t, msg)
        self.up.append(msg)
        srv.expect(Expect(terminals, self.batch))
        if terminals != b"Z":  # an extended-protocol message: the batch is open upstream until Sync
            self.batch_forwarded = True
        return None

    async def _forward_later(self, t: int, msg: bytes) -> None:
        try:
            await self.acquire()
        except TooManyConnections as exc:
            self.app.stats.errors += 1
            self.write(m.error_message(exc.fields))
            if t == 0x51:
                self.write(m.ReadyForQuery("I").encode())
            else:
                self.failed_batch = self.batch
            return
        step = self._dispatch(t, msg)
        self.flush_up()
        if step is not None:
            await step

    def _extended(self, t: int, msg: bytes) -> Step:
        local = self.local
        if t == 0x45:  # Execute
            self.app.stats.queries += 1
            if local.portals and local.has_portal(msg):
                return local.execute(msg)
            return self._forward(t, msg, b"CsI")
        if t == 0x48:  # Flush
            if self.server is not None and self.server.entries:
                self.up.append(msg)
            return None
        if t == 0x50:  # Parse
            self.local.note_sql(msg, parse=True)
            if _PGML.search(msg, 5) is not None:
                return local.parse(m.Parse.parse(msg[5:]))
            if not self.tx and not local.stmts:
                return self._forward(t, msg, b"1")
            return self._parse(msg)
        if not self.tx and not local.stmts and not local.portals:
            return self._forward(t, msg, b"2" if t == 0x42 else b"3" if t == 0x43 else b"Tn")
        return self._named(t, msg)

    def _parse(self, msg: bytes) -> Step:
        p = m.Parse.parse(msg[5:])
        self.local.forget_statement(p.name)
        if not self.tx or p.name == "":
            if self.tx:
                self.unnamed = msg
                srv = self._server_now()
                if srv is not None:
                    srv.unnamed = msg
            return self._forward(0x50, msg, b"1")
        key = f"{p.sql}\0{p.param_oids}\0{self.want.get('search_path', '')}".encode()
        srvname = "pgmlproxy_" + hashlib.sha1(key, usedforsecurity=False).hexdigest()[:20]
        self.stmts[p.name] = (srvname, m.Parse(srvname, p.sql, p.param_oids).encode())
        srv = self._server_now()
        if srv is None:
            return self._forward_later(0x50, msg)
        if srvname in srv.prepared:
            srv.expect(Expect(b"", self.batch, synthetic=m.PARSE_COMPLETE))
            return None
        return self._forward(0x50, self._prepare(srv, p.name, SWALLOW_NONE, send=False), b"1")

    def _prepare(self, srv: ServerConn, name: str, swallow: int, send: bool = True) -> bytes:
        srvname, parse = self.stmts[name]
        srv.prepared.add(srvname)
        if send:
            self.up.append(parse)
            srv.expect(Expect(b"1", self.batch, swallow, stmt=srvname))
        return parse

    def _named(self, t: int, msg: bytes) -> Step:
        """Bind, Describe and Close: answer local objects here, rename prepared statements upstream."""
        r = m.Reader(msg[5:])
        if t == 0x42:
            portal, stmt = r.cstr(), r.cstr()
        else:
            kind = r.byte()
            portal, stmt = ("", r.cstr()) if kind == b"S" else (r.cstr(), "")
            if kind == b"P":
                if self.local.has_portal_name(portal):
                    return self.local.describe_portal(portal) if t == 0x44 else self.local.close(b"P", portal)
                return self._forward(t, msg, b"Tn" if t == 0x44 else b"3")
        if stmt in self.local.stmts:
            if t == 0x42:
                return self.local.bind(m.Bind.parse(msg[5:]))
            return self.local.describe_statement(stmt) if t == 0x44 else self.local.close(b"S", stmt)
        if t == 0x42:
            self.local.forget_portal(portal)
        if not self.tx:
            return self._forward(t, msg, b"2" if t == 0x42 else b"3" if t == 0x43 else b"Tn")
        srv = self._server_now()
        if srv is None:
            return self._forward_later(t, msg)
        if t == 0x43 and stmt in self.stmts:  # Close: keep it prepared upstream for the next user
            del self.stmts[stmt]
            self.reply(m.CLOSE_COMPLETE)
            return None
        if stmt == "":
            if self.unnamed is not None and srv.unnamed != self.unnamed:
                self.up.append(self.unnamed)
                srv.expect(Expect(b"1", self.batch, SWALLOW_OK))
                srv.unnamed = self.unnamed
        elif stmt in self.stmts:
            srvname = self.stmts[stmt][0]
            if srvname not in srv.prepared:
                self._prepare(srv, stmt, SWALLOW_OK)
            rest = msg[5 + r.pos :]
            head = (m.cstr(portal) if t == 0x42 else b"S") + m.cstr(srvname)
            msg = m.frame(bytes([t]), head + rest)
        return self._forward(t, msg, b"2" if t == 0x42 else b"3" if t == 0x43 else b"Tn")

    def _sync(self) -> Step:
        srv = self.server
        if srv is not None and self.batch_forwarded:
            self.up.append(m.SYNC)
            srv.expect(Expect(b"Z", self.batch))
        else:
            self.reply(m.ReadyForQuery(srv.tx_status if srv is not None else "I").encode())
        self.batch += 1
        self.batch_forwarded = False
        if srv is not None and not srv.entries:
            self.maybe_release()
        return None

    # --- callbacks from the server connection --------------------------------------------
    def server_error(self, batch: int) -> None:
        """The upstream sent an error; in extended batch `batch` (-1: a simple Query) skip to Sync."""
        if batch >= 0:
            self.failed_batch = batch
        self.app.stats.errors += 1

    def server_ready(self) -> None:
        self.maybe_release()

    def server_param(self, name: str, value: str) -> None:
        if name not in UNSETTABLE:
            self.want[name] = value
        if name == "application_name":
            self.application_name = value

    def server_lost(self, conn: ServerConn) -> None:
        if self.server is conn:
            self.server = None
            if self.pool is not None:
                self.pool.discard(conn)
            self.fatal(PgError("the upstream server connection was lost", fields={"C": "08006"}))

    def maybe_release(self) -> None:
        """Transaction mode: the server connection goes back once the client is between transactions."""
        srv = self.server
        if (not self.tx or srv is None or self.holding or srv.entries or srv.tx_status != "I"
                or srv.internal or self.batch_forwarded or self.pool is None):
            return
        self.server = None
        srv.client = None
        self.pool.release(srv)

    # --- the planner's view of this client -----------------------------------------------
    async def hold(self) -> ServerConn:
        """The server connection, with nothing owed, switched to the proxy's own requests."""
        srv = await self.acquire()
        self.holding = True
        await srv.idle()
        srv.internal = True
        return srv

    def unhold(self) -> None:
        if self.holding:
            self.holding = False
            srv = self.server
            if srv is not None:
                srv.internal = False
                srv.inbox.clear()

    def context(self, notice: Callable[[str], Awaitable[None]]) -> CallContext:
        return CallContext(notice=notice, user=self.user, database=self.database,
                           upstream=self.local.upstream)

    def sink(self) -> ClientSink:
        return ClientSink(self.write)

    def cancel(self) -> None:
        """A CancelRequest for this client: stop its upstream query and its planner work."""
        srv = self.server
        if srv is not None and (srv.entries or (self.holding and srv.internal)):
            self.app.spawn(self.app.cancel_backend(srv))
        self.local.cancel()  # stops its model work; cancels the task only when not holding
