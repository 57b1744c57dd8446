"""One client session: the proxy playing the server to a driver, as an asyncio adapter.

The session's protocol state and the decisions that follow from it (phase, extended
batch and skip-to-Sync, routing by message type, how a Sync is answered, when the server
connection goes back to the pool, what a vanished client's server connection gets) are
`proxy.session.Session`'s; this module moves bytes and carries them out. It also owns
which server connection serves the client, the replay of session settings and named
prepared statements onto whichever server connection runs them (with proxy.txstate), and
the hook that hands statements calling pgml to the planner. Messages that need no
rewriting are relayed as the client sent them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from core.errors import (
    DuplicatePreparedStatement,
    FeatureNotSupported,
    InternalError,
    PgError,
    ProtocolViolation,
    TooManyConnections,
)
from core.errors import SqlclientUnableToEstablishSqlconnection as CannotConnect
from core.interfaces import CallContext
from proxy import messages as m
from proxy import txstate as txs
from proxy.backend import ServerConn, settings_sql
from proxy.localexec import Cork, LocalStatements
from proxy.replicas import LSN_SQL, ClientRoute
from proxy.session import (
    TEMP_WORDS,
    Expect,
    Leave,
    Phase,
    Reply,
    Route,
    Session,
    Swallow,
    SyncAnswer,
    plain,
    refusal_sql,
    unpoolable,
)
from proxy.sink import ClientSink
from proxy.startup import UNSETTABLE, startup_bytes

if TYPE_CHECKING:
    from proxy.app import ProxyServer
    from proxy.pool import Pool

log = logging.getLogger("pgml_proxy.frontend")
_ids = itertools.count(1)
_PGML = re.compile(rb"[pP][gG][mM][lL]")
Step = Coroutine[Any, Any, None] | None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


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
        self.cork: Cork | None = None  # a local statement's replies, sent together (proxy/localexec.py)
        self.addr = ""
        self.framer = m.Framer(app.config.max_message_size)
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
        self.s = Session(app.config.pool_mode == "transaction")  # phase, batch, release decisions
        # Transaction mode: the client's named statements and settings (proxy.txstate); the
        # unnamed statement's Parse and what its SQL does, and that of portals bound from one.
        self.txs = txs.ClientTx()
        self.unnamed: bytes | None = None
        self.unnamed_scan: tuple[txs.Stmt, ...] | None = None
        self.portal_scan: dict[str, tuple[txs.Stmt, ...]] = {}
        self.local = LocalStatements(self)
        # Replicas, transaction pooling: which server each transaction runs on (proxy.replicas).
        self.route = ClientRoute(app) if app.upstreams is not None and self.tx else None

    # --- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.app.clients[self.id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.phase = Phase.CLOSED
        self.app.forget(self)
        if self.task is not None:
            self.task.cancel()
        self.local.cancel()
        srv, self.server = self.server, None
        if srv is None or self.pool is None:
            return
        srv.client = None
        leave = self.s.leave(len(srv.replies), srv.tx_status, srv.internal, self.txs.dirty)
        if leave is Leave.CANCEL_AND_CLOSE:
            self.app.spawn(self.app.cancel_backend(srv))
            self.pool.discard(srv)
        elif leave is Leave.FINISH:
            self.app.spawn(self.pool.reset_and_release(srv, sync_owed=self.s.sync_owed))
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
            if self.s.phase is Phase.STARTUP:
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
                if self.s.phase is Phase.AUTH:
                    self.auth_queue.put_nowait((t, msg[5:]))
                elif self.s.phase is Phase.READY:
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
        if self.transport is not None and self.s.phase is not Phase.CLOSED:
            self.app.stats.bytes_out += len(data)
            if self.cork is not None and self.cork.hold(data):
                return
            self.transport.write(data)

    def reply(self, data: bytes) -> None:
        """Send a response of our own, after whatever the upstream still owes the client."""
        srv = self.server
        if srv is not None and srv.replies:
            srv.expect(Expect(Reply.NOTHING, self.s.batch, synthetic=data))
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
        if self.cork is not None:
            self.cork.release()
        if self.transport is not None:
            self.transport.close()

    def ready(self) -> None:
        """Login is done: what the client already sent is handled next, in order."""
        self.s.phase = Phase.READY
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
            while self.pending and self.s.phase is Phase.READY:
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
        if self.pending and self.s.phase is Phase.READY:
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
        match self.s.route(t):
            case Route.QUERY:
                return self._simple(t, msg)
            case Route.EXTENDED | Route.FLUSH:
                return self.local.refuse_extended(t) if self.admin else self._extended(t, msg)
            case Route.SYNC:
                return self._sync()
            case Route.SKIP:
                return None  # skipping to Sync after an error
            case Route.COPY:  # CopyData, CopyDone, CopyFail: the server conn is ours
                if self.server is not None:
                    self.up.append(msg)
                return None
            case Route.FUNCTION_CALL:  # libpq's large objects: relayed like a simple Query
                self.app.stats.queries += 1
                if self.admin:
                    exc = FeatureNotSupported("the pgml_proxy admin database answers simple queries only")
                    self.reply(m.error_message(exc.fields) + m.ReadyForQuery("I").encode())
                    return None
                return self._forward(t, msg, Reply.READY)
            case Route.TERMINATE:
                self.close()
                return None
        raise ProtocolViolation(f"invalid frontend message type {t} ({chr(t)!r})")

    def _simple(self, t: int, msg: bytes) -> Step:
        """A Query: the admin console's, the planner's (it calls pgml), or relayed as bytes."""
        self.app.stats.queries += 1
        if self.route is None and not self.admin and plain(msg):  # the common case, relayed
            if not self.tx:
                return self._forward(t, msg, Reply.READY)
            srv = self._server_now()
            if srv is None:
                return self._forward_later(t, msg)
            self.unnamed = srv.unnamed = None  # a simple Query drops the unnamed statement upstream
            self.up.append(msg)
            srv.expect(Expect(Reply.READY, self.s.batch))
            return None
        self.local.note_sql(msg, parse=False)  # statement_timeout may change
        if self.admin:
            return self.local.admin_query(m.Query.parse(msg[5:]).sql)
        if self.route is not None and self.route.query(self, msg):
            return None  # SET pgml_proxy.route, answered here
        if _PGML.search(msg, 5) is not None and not self._passes_through(msg):
            return self.local.simple_query(m.Query.parse(msg[5:]).sql)
        if self.tx:
            return self._query(msg)
        return self._forward(t, msg, Reply.READY)

    def _passes_through(self, msg: bytes) -> bool:
        """A Query that names pgml but calls none of it (the planner decides): relayed as bytes."""
        check = getattr(self.app.handler, "passes_through", None)
        if check is None:
            return False
        try:
            return bool(check(m.Query.parse(msg[5:]).sql))
        except Exception:  # the local path reports whatever is wrong with it
            return False

    def _server_now(self) -> ServerConn | None:
        if self.server is not None:
            return self.server
        if self.route is not None:
            self.pool = self.route.pool(self)
        assert self.pool is not None
        conn = self.pool.try_acquire()
        if conn is not None:
            self._attach(conn)
        return conn

    def _attach(self, conn: ServerConn) -> None:
        conn.client = self
        conn.internal = False
        self.server = conn
        if conn.last_client is not self or conn.txs.settings != self.txs.settings:
            self._replay_settings(conn)  # (the client may have SET something elsewhere since)
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
        for k, val in changes.items():
            if k not in conn.params and val is not None:
                conn.extra[k] = val
        # What SET and friends left (the server's account, read before the client last let go);
        # kept apart from `extra`, which a new client's login resets.
        wanted = {k.lower() for k in self.want}
        for k, val in txs.settings_changes(self.txs.settings, conn.txs.settings).items():
            if val is not None or k not in wanted:
                changes[k] = val
        conn.txs.settings = dict(self.txs.settings)
        if not changes:
            return
        self.up.append(m.Query(settings_sql(changes)).encode())
        conn.unnamed = None
        conn.expect(Expect(Reply.READY, self.s.batch, Swallow.ALL))

    async def acquire(self, routed: bool = False) -> ServerConn:
        """A server connection for this client, waiting for the pool when it must (`routed`:
        `_server_now` has just chosen the pool for this transaction)."""
        if self.server is not None:
            return self.server
        if self.route is not None and not routed:
            self.pool = self.route.pool(self)
        assert self.pool is not None
        try:
            conn = await self.pool.acquire()
        except CannotConnect as exc:  # a replica gone: banned, and the transaction goes elsewhere
            other = self.route.failed(self, self.pool, exc) if self.route is not None else None
            if other is None:
                raise
            self.pool = other
            conn = await other.acquire()
        if self.s.phase is Phase.CLOSED:
            self.pool.release(conn)
            raise asyncio.CancelledError()
        self._attach(conn)
        self.flush_up()
        return conn

    def _forward(self, t: int, msg: bytes, terminals: Reply) -> Step:
        srv = self._server_now()
        if srv is None:
            return self._forward_later(t, msg)
        self.up.append(msg)
        srv.expect(Expect(terminals, self.s.batch))
        self.s.forwarded(terminals)
        return None

    async def _forward_later(self, t: int, msg: bytes) -> None:
        try:
            await self.acquire(routed=True)
        except (TooManyConnections, CannotConnect) as exc:  # the session stays usable
            self.app.stats.errors += 1
            self.write(m.error_message(exc.fields))
            if t == 0x51:
                self.write(m.ReadyForQuery("I").encode())
            else:
                self.s.failed()
            return
        step = self._dispatch(t, msg)
        self.flush_up()
        if step is not None:
            await step

    def _extended(self, t: int, msg: bytes) -> Step:
        local = self.local
        if self.route is not None:
            self.route.extended(t, msg)
        if t == 0x45:  # Execute
            self.app.stats.queries += 1
            if local.portals and local.has_portal(msg):
                return local.execute(msg)
            if self.portal_scan:
                return self._execute(msg)
            return self._forward(t, msg, Reply.EXECUTE)
        if t == 0x48:  # Flush
            if len(msg) > 5:  # a body Postgres cannot read: its 08P01, then it skips to Sync
                if self.server is None:
                    return self._bad_message(t)
                self.up.append(msg)  # its error comes unasked, after what is owed before it
                self.s.forwarded(Reply.NOTHING)
                return None
            if self.server is not None and self.server.replies:
                self.up.append(msg)
            return None
        if t == 0x50:  # Parse
            if msg[5] == 0 and not local.stmts and plain(msg):  # the unnamed statement, relayed
                return self._parse_unnamed(msg)
            self.local.note_sql(msg, parse=True)
            if _PGML.search(msg, 5) is not None:
                return local.parse(m.Parse.parse(msg[5:]))
            if not self.tx and not local.stmts:
                return self._forward(t, msg, Reply.PARSE)
            return self._parse(msg)
        if not self.tx and not local.stmts and not local.portals:
            return self._forward(t, msg, Reply.to(t))
        if (t == 0x42 and msg[5] == 0 and msg[6] == 0 and self.unnamed_scan is None and not local.stmts
                and not local.portals):  # Bind of the unnamed statement to the unnamed portal
            return self._bind_unnamed(msg)
        return self._named(t, msg)

    def _parse_unnamed(self, msg: bytes) -> Step:
        """`_parse` of the unnamed statement whose text `plain` clears: no name, nothing to scan."""
        if not self.tx:
            return self._forward(0x50, msg, Reply.PARSE)
        srv = self._server_now()
        if srv is None:
            return self._forward_later(0x50, msg)
        self.unnamed, self.unnamed_scan = msg, None
        srv.unnamed = msg
        return self._forward(0x50, msg, Reply.PARSE)

    def _bind_unnamed(self, msg: bytes) -> Step:
        """`_named` for a Bind of the unnamed statement to the unnamed portal, in transaction
        mode: the server gets the client's unnamed statement first if it holds another."""
        srv = self._server_now()
        if srv is None:
            return self._forward_later(0x42, msg)
        if self.unnamed is not None and srv.unnamed != self.unnamed:
            self.up.append(self.unnamed)
            srv.expect(Expect(Reply.PARSE, self.s.batch, Swallow.OK))
            srv.unnamed = self.unnamed
        if self.portal_scan:
            self.portal_scan.pop("", None)
        return self._forward(0x42, msg, Reply.BIND)

    def _bad_message(self, t: int) -> Step:
        """Postgres's answer to a message whose body it cannot read (no server to ask)."""
        self._batch_error(ProtocolViolation(f"invalid message format (message type {chr(t)!r})"))
        return None

    def _parse(self, msg: bytes) -> Step:
        p = m.Parse.parse(msg[5:])
        self.local.forget_statement(p.name)
        if not self.tx:
            return self._forward(0x50, msg, Reply.PARSE)
        srv = self._server_now()
        if srv is None:
            return self._forward_later(0x50, msg)
        what = unpoolable(p.sql.encode(), srv.tx_status)
        if what is not None:
            p = m.Parse(p.name, refusal_sql(what), p.param_oids)
            msg = p.encode()
        elif TEMP_WORDS.search(msg, 5) is not None:
            self.s.temp_objects = True
        scan = txs.scan(p.sql) if txs.hint(msg) else None
        if scan is not None:
            # Postgres looks up EXECUTE's statement when it parses (its result columns): the
            # server must hold the client's version of each name the statement uses by then.
            self._sync_extended(srv, scan)
        if p.name == "":
            self.unnamed, self.unnamed_scan = msg, scan
            srv.unnamed = msg
            return self._forward(0x50, msg, Reply.PARSE)
        if p.name in self.txs.stmts or p.name in self.txs.sql:  # one namespace, as upstream
            self._batch_error(DuplicatePreparedStatement(f'prepared statement "{p.name}" already exists'))
            return None
        path = self.want.get("search_path") or self.txs.settings.get("search_path", "")
        srvname = txs.server_name(p.sql, p.param_oids, path)
        prep = txs.Prepared(srvname, m.Parse(srvname, p.sql, p.param_oids).encode(), scan,
                            txs.as_sql(p.name, p.sql, p.param_oids))
        if srvname in srv.txs.prepared:
            srv.expect(Expect(Reply.NOTHING, self.s.batch, synthetic=m.PARSE_COMPLETE,
                              track=txs.parse(self.txs, None, p.name, prep)))
            return None
        self.up.append(prep.parse)
        srv.expect(Expect(Reply.PARSE, self.s.batch, track=txs.parse(self.txs, srv.txs, p.name, prep)))
        self.s.forwarded(Reply.PARSE)
        return None

    def _prepare(self, srv: ServerConn, prep: txs.Prepared) -> None:
        """Prepare a statement of this client's again, on a server connection that lacks it."""
        self.up.append(prep.parse)
        srv.expect(Expect(Reply.PARSE, self.s.batch, Swallow.OK, track=txs.parse(None, srv.txs, "", prep)))

    def _batch_error(self, exc: PgError) -> None:
        """An error of the proxy's own in an extended batch: sent in order, then skip to Sync."""
        self.app.stats.errors += 1
        self.reply(m.error_message(exc.fields))
        self.s.failed()

    def _query(self, msg: bytes) -> Step:
        """A simple Query in transaction mode: put the server in step with the names it uses."""
        srv = self._server_now()
        if srv is None:
            return self._forward_later(0x51, msg)
        self.unnamed = srv.unnamed = None  # a simple Query drops the unnamed statement upstream
        what = unpoolable(memoryview(msg)[5:], srv.tx_status)
        if what is not None:
            msg = m.Query(refusal_sql(what)).encode()
        elif TEMP_WORDS.search(msg, 5) is not None:
            self.s.temp_objects = True
        scan = txs.scan(m.Query.parse(msg[5:]).sql) if txs.hint(msg) else None
        track = None
        if scan is not None:
            syncs = txs.sync(self.txs, srv.txs, scan)
            tracks, track = txs.begin_query(self.txs, srv.txs, syncs, scan)
            for s, tr in zip(syncs, tracks, strict=True):
                # The proxy's own statements: if one fails the client's own says why.
                srv.expect(Expect(Reply.READY, self.s.batch, Swallow.ALL, track=tr))
                self.up.append(m.Query(s.text).encode())
        self.up.append(msg)
        srv.expect(Expect(Reply.READY, self.s.batch, track=track))
        return None

    def _sync_extended(self, srv: ServerConn, scan: tuple[txs.Stmt, ...]) -> None:
        """Before a Bind or Describe: `_query`'s sync as extended messages, on the unnamed statement."""
        for s in txs.sync(self.txs, srv.txs, scan):
            track = txs.begin(self.txs, srv.txs, [s], sync_only=True)
            # An error here aborts the client's batch upstream: it is relayed (Swallow.OK).
            for msg, ends, tr in (
                (m.Parse("", s.text).encode(), Reply.PARSE, None),
                (m.Bind("", "").encode(), Reply.BIND, None),
                (m.Execute("").encode(), Reply.EXECUTE, track),
            ):
                self.up.append(msg)
                srv.expect(Expect(ends, self.s.batch, Swallow.OK, track=tr))
            srv.unnamed = None
            self.s.forwarded(Reply.EXECUTE)

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
                return self._forward(t, msg, Reply.to(t))
        if stmt in self.local.stmts:
            if t == 0x42:
                return self.local.bind(m.Bind.parse(msg[5:]))
            return self.local.describe_statement(stmt) if t == 0x44 else self.local.close(b"S", stmt)
        if t == 0x42:
            self.local.forget_portal(portal)
        if not self.tx:
            return self._forward(t, msg, Reply.to(t))
        srv = self._server_now()
        if srv is None:
            return self._forward_later(t, msg)
        if t == 0x43:  # Close: answered here; what is prepared upstream stays for the next user
            # In its turn, and undone if the batch fails before it is due.
            srv.expect(Expect(Reply.NOTHING, self.s.batch, synthetic=m.CLOSE_COMPLETE,
                              track=txs.close(self.txs, stmt)))
            return None
        prep = self.txs.stmts.get(stmt) if stmt else None
        scan = self.unnamed_scan if stmt == "" else prep.stmts if prep is not None else None
        # First what the server must hold for the names the statement uses (this borrows the
        # unnamed statement upstream: it is parsed again below when the client's is needed).
        if prep is None and stmt:  # a PREPAREd name, or none: this client's version, or none
            self._sync_extended(srv, (txs.Stmt("execute", stmt),))
        if scan is not None:  # a Describe too: Postgres looks up EXECUTE's statement for it
            self._sync_extended(srv, scan)
        if stmt == "":
            if self.unnamed is not None and srv.unnamed != self.unnamed:
                self.up.append(self.unnamed)
                srv.expect(Expect(Reply.PARSE, self.s.batch, Swallow.OK))
                srv.unnamed = self.unnamed
        elif prep is not None:
            if prep.srvname not in srv.txs.prepared:
                self._prepare(srv, prep)
            rest = msg[5 + r.pos :]
            head = (m.cstr(portal) if t == 0x42 else b"S") + m.cstr(prep.srvname)
            msg = m.frame(bytes([t]), head + rest)
        if t == 0x42:
            if scan is not None:
                self.portal_scan[portal] = scan
            else:
                self.portal_scan.pop(portal, None)
        return self._forward(t, msg, Reply.to(t))

    def _execute(self, msg: bytes) -> Step:
        srv = self._server_now()
        if srv is None:
            return self._forward_later(0x45, msg)
        scan = self.portal_scan.pop(m.Execute.parse(msg[5:]).portal, None)
        track = None if scan is None else txs.begin(self.txs, srv.txs, scan)
        self.up.append(msg)
        srv.expect(Expect(Reply.EXECUTE, self.s.batch, track=track))
        self.s.forwarded(Reply.EXECUTE)
        return None

    def _sync(self) -> Step:
        srv = self.server
        batch = self.s.batch
        if self.s.sync(srv is not None) is SyncAnswer.FORWARD:
            assert srv is not None
            self.up.append(m.SYNC)
            srv.expect(Expect(Reply.READY, batch))
        else:
            self.reply(m.ReadyForQuery(srv.tx_status if srv is not None else "I").encode())
        if srv is not None and not srv.replies:
            self.maybe_release()
        return None

    # --- callbacks from the server connection --------------------------------------------
    def server_error(self, batch: int) -> None:
        """The upstream sent an error; in extended batch `batch` (-1: a simple Query) skip to Sync."""
        if batch >= 0:
            self.s.failed(batch)
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
            if conn.said_fatal:  # the client has Postgres's own reason; then the close, as direct
                self.close()
            else:
                self.fatal(PgError("the upstream server connection was lost", fields={"C": "08006"}))

    def maybe_release(self) -> None:
        """Transaction mode: the server connection goes back once the client is between transactions."""
        srv = self.server
        if srv is None or self.pool is None or not self.s.may_release(len(srv.replies), srv.tx_status,
                                                                      srv.internal):
            return
        if self.s.temp_objects:  # temporary tables end with their transaction: no one else sees them
            self.s.temp_objects = False
            srv.expect(Expect(Reply.READY, self.s.batch, Swallow.ALL))
            srv.send_query("DISCARD TEMP")
            return
        if self.txs.dirty:  # a SET may have changed the session: ask the server what stuck
            self.txs.dirty = False
            srv.expect(Expect(Reply.READY, self.s.batch, Swallow.ALL, track=txs.Capture(self._captured)))
            srv.send_query(txs.CAPTURE_SQL)
            return
        if self.route is not None and self.route.lsn_owed:  # read-your-writes: where it committed
            self.route.lsn_owed = False
            srv.expect(Expect(Reply.READY, self.s.batch, Swallow.ALL, track=txs.Capture(self.route.lsn_read)))
            srv.send_query(LSN_SQL)
            return
        self.server = None
        srv.client = None
        self.pool.release(srv)

    def _captured(self, rows: list[bytes]) -> None:
        srv = self.server
        values = [m.DataRow.parse(body).values for body in rows]
        got = txs.captured(((_text(v[0]), _text(v[1])) for v in values), srv.params if srv else ())
        self.txs.settings = got
        if srv is not None:
            srv.txs.settings = dict(got)

    # --- the planner's view of this client -----------------------------------------------
    async def hold(self) -> ServerConn:
        """The server connection, with nothing owed, switched to the proxy's own requests."""
        srv = await self.acquire()
        self.s.holding = True
        await srv.idle()
        srv.internal = True
        # The proxy's own requests (HeldUpstream) parse the unnamed statement or run simple
        # Queries, which drop it: the client's must be parsed again before its next Bind.
        srv.unnamed = None
        return srv

    def unhold(self) -> None:
        if self.s.holding:
            self.s.holding = False
            srv = self.server
            if srv is not None:
                srv.internal = False
                srv.inbox.clear()

    def context(self, notice: Callable[[str], Awaitable[None]],
                warn: Callable[[str], Awaitable[None]] | None = None) -> CallContext:
        return CallContext(notice=notice, user=self.user, database=self.database,
                           upstream=self.local.upstream, warn=warn)

    def sink(self) -> ClientSink:
        return ClientSink(self.write)

    def cancel(self) -> None:
        """A CancelRequest for this client: stop its upstream query and its planner work."""
        srv = self.server
        if srv is not None and (srv.replies or (self.s.holding and srv.internal)):
            self.app.spawn(self.app.cancel_backend(srv))
        self.local.cancel()  # stops its model work; cancels the task only when not holding
