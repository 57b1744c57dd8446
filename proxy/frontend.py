"""One client session: the proxy playing the server to a driver, as an asyncio adapter.

The session's protocol state and the decisions that follow from it are sans-IO objects
that this module feeds and carries out: `proxy.session.Session` (phase, extended batch and
skip-to-Sync, routing by message type, how a Sync is answered, when the server connection
goes back to the pool, what a vanished client's server connection gets), each server
connection's `proxy.session.Replies` (what it owes, what reaches the client) and, in
transaction pooling, `proxy.txrelay.TxRelay` (what goes upstream before and with each
message: settings, statements, renames, refusals). This module frames, routes, moves bytes,
chooses which server connection serves the client, and hands statements calling pgml to
the planner. Messages that need no rewriting are relayed as the client sent them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from core.errors import (
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
from proxy.backend import ServerConn
from proxy.localexec import Cork, LocalStatements, Step
from proxy.replicas import LSN_SQL, ClientRoute
from proxy.session import (
    OWES_READY,
    Expect,
    Leave,
    Phase,
    Reply,
    Route,
    Session,
    Swallow,
    SyncAnswer,
    Tracker,
    plain,
)
from proxy.sink import ClientSink
from proxy.startup import UNSETTABLE, startup_bytes
from proxy.txrelay import Out, TxRelay, UnnamedChange

if TYPE_CHECKING:
    from proxy.app import ProxyServer
    from proxy.pool import Pool

log = logging.getLogger("pgml_proxy.frontend")
_ids = itertools.count(1)
_PGML = re.compile(rb"[pP][gG][mM][lL]")
_HEAD = struct.Struct("!xI").unpack_from  # a message's length, after its type byte


def _of_unnamed(t: int, data: bytes, start: int, end: int) -> bool:
    """Whether the Bind, or the Describe or Close of a statement, framed at data[start:end]
    names the unnamed statement (a Bind's statement name follows its portal's). False for a
    malformed one: it goes upstream as sent, and Postgres says what is wrong."""
    if t != 0x42:
        return end - start >= 7 and data[start + 5] == 0x53 and data[start + 6] == 0
    nul = data.find(b"\0", start + 5, end)
    return 0 <= nul < end - 1 and data[nul + 1] == 0


# What each message of an extended batch relayed whole owes (Frontend._relay_batch), one entry
# shared by every such batch (an Expect never changes). Their batch is -1, a simple Query's: the
# batch went upstream with its Sync, so an error in it leaves nothing of the client's to skip
# (Postgres skips to that Sync itself; the client's next batch has begun).
_BATCH_OWES = {
    0x50: Expect(Reply.PARSE, -1), 0x42: Expect(Reply.BIND, -1),
    0x44: Expect(Reply.DESCRIBE, -1), 0x45: Expect(Reply.EXECUTE, -1),
}
_BATCH_SYNC = Expect(Reply.READY, -1, sync=True)


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
        self.want: dict[str, str] = {}  # the reported settings a server connection must carry
        self._want_key: tuple[tuple[str, str], ...] | None = None
        self.pending: deque[tuple[int, bytes]] = deque()
        self.auth_queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        # The running step, or a future while the client's Query waits for the turn's fast-path
        # batch (LocalStatements.answered_again): either way, what it sends meanwhile waits.
        self.task: asyncio.Future[None] | None = None
        self.up: list[bytes] = []
        self.s = Session(app.config.pool_mode == "transaction")  # phase, batch, release decisions
        # Transaction mode: the client's named statements, settings and unnamed statement, and
        # what goes upstream with each of its messages (proxy.txrelay, sans-IO).
        self.relay = TxRelay()
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
        leave = self.s.leave(len(srv.replies), srv.tx_status, srv.internal, self.relay.txs.dirty)
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
        # Every plain statement, in as few steps as can be: a whole simple Query that `plain`
        # clears goes to the client's own server connection, or in transaction pooling to one
        # free now (each function call and object touched here costs the relay about a
        # microsecond, more on a busy CPU). Anything else, or no server free: the general path.
        # (Skipping to Sync after an error: the general path ignores the Query.)
        ss = self.s
        srv = self.server
        if (data[:1] == b"Q" and self.task is None and ss.phase is Phase.READY and ss.failed_batch != ss.batch
                and not self.framer.buf and len(data) >= 5 and _HEAD(data)[0] + 1 == len(data)
                and self.route is None and plain(data)
                and (srv is not None
                     or (self.tx and not self.admin and (srv := self._server_now()) is not None))):
            stats = self.app.stats
            stats.bytes_in += len(data)
            stats.queries += 1
            if self.tx:
                self.relay.unnamed = srv.unnamed = None  # a simple Query drops the unnamed statement upstream
            srv.replies.queue.append(OWES_READY)
            if self.up:  # whatever went before it goes first (settings for a server just taken)
                self.up.append(data)
                self.flush_up()
            else:
                srv.send(data)
            return
        self.app.stats.bytes_in += len(data)
        try:
            if self.task is None:
                head = data[:1]
                if head == b"Q" and self._answered_again(data):
                    return
                if head == b"B" and self.local.stmts:  # (no relay in one step with local statements)
                    if self._answered_batch(data):
                        return
                elif (head == b"P" or head == b"B") and self._relay_batch(data):
                    return
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

    def _answered_again(self, data: bytes) -> bool:
        """`data` is one whole Query that the fast path answered before (LocalStatements keeps
        those that nothing else of the session looks at), answered again in one step. False:
        nothing was done, the general path takes it."""
        s = self.s
        return (s.phase is Phase.READY and s.failed_batch != s.batch and not self.framer.buf
                and not self.admin and self.route is None and len(data) >= 5
                and _HEAD(data)[0] + 1 == len(data) and self.local.answered_again(data))

    def _answered_batch(self, data: bytes) -> bool:
        """`data` is one whole extended batch on a local statement (Bind to the unnamed portal,
        Describe of it or not, Execute with no row limit, Sync) that the fast path answers
        (LocalStatements.answered_batch, or answered_batch_again for the bytes of one it answered
        before). False: nothing was done, the general path takes it."""
        s = self.s
        if (s.phase is not Phase.READY or self.framer.buf or self.admin or self.route is not None
                or s.failed_batch == s.batch or s.sync_owed or data[-5:] != m.SYNC):
            return False
        if self.local.answered_batch_again(data):
            return True
        msgs, used = m.scan(data, self.framer.max_size)
        n = len(msgs)
        if used != len(data) or not (
            (n == 4 and msgs[1][0] == 0x44 and msgs[2][0] == 0x45) or (n == 3 and msgs[1][0] == 0x45)
        ) or msgs[0][0] != 0x42:
            return False
        _, start, end = msgs[0]
        b = m.Bind.parse(data[start + 5 : end])
        if b.portal != "":
            return False
        if n == 4 and data[msgs[1][1] + 5 : msgs[1][2]] != b"P\0":  # Describe of the portal
            return False
        _, start, end = msgs[-2]
        if data[start + 5 : end] != b"\0\0\0\0\0":  # Execute of the unnamed portal, no row limit
            return False
        return self.local.answered_batch(b, describe=n == 4, data=data)

    def _relay_batch(self, data: bytes) -> bool:
        """`_extended`'s relay in one step for the common extended batch: whole in `data`, on
        the unnamed statement and portal (a Parse that `plain` clears, Bind, Describe of the
        portal, Execute; any names under session pooling), ending in its Sync, for the server
        connection this client holds or one free now. False: nothing of it was done, the
        general path takes it."""
        s = self.s
        if (s.phase is not Phase.READY or self.framer.buf or self.admin or self.route is not None
                or s.skipping or self.local.stmts or self.local.portals or data[-5:] != m.SYNC
                or self.relay.unnamed_scan is not None or self.relay.portal_scan):
            return False
        # One walk over the batch's messages, nothing changed until all of it is known good (a
        # length out of bounds: the general path, whose framing refuses it, says why).
        n = len(data)
        head, max_size = m.HEAD, self.framer.max_size
        pos = 0
        owed: list[Expect] = []
        executes = 0
        parse = None
        # Session pooling relays names as they are; transaction pooling renames named
        # statements (TxRelay), so there only the unnamed ones take this path, and a Bind of a
        # named statement the server holds already (renamed below: `_renamed_bind`).
        named = not self.tx
        unnamed = False  # whether a Bind before any Parse names the unnamed statement
        bind = -1  # transaction pooling: where the Bind of a named statement ends
        while True:
            if n - pos < 5:
                return False
            t, length = head(data, pos)
            start, end = pos, pos + 1 + length
            if length < 4 or end > n or length > max_size:
                return False
            if t == 0x53:  # the Sync: the last message
                if end != n:
                    return False
                break
            if length < 6:  # too short for the names read below: the general path says why
                return False
            name = data[start + 5]
            if t == 0x50:  # Parse of the unnamed statement
                if (name != 0 and not named) or not plain(data[start:end]):
                    return False
                if name == 0:
                    if start:  # one that an error before it may skip: the general path tracks it
                        return False
                    parse = data[start:end]
            elif t == 0x42:  # Bind to the unnamed portal
                if (name != 0 or data[start + 6] != 0) and not named:
                    if name != 0 or start:  # to the unnamed portal, first (so the only one)
                        return False
                    bind = end
                elif parse is None and _of_unnamed(t, data, start, end):
                    unnamed = True
            elif t == 0x44:  # Describe of the unnamed portal
                if (name != 0x50 or data[start + 6] != 0) and not named:
                    return False
            elif t == 0x45 and (name == 0 or named):  # Execute of it; nothing else
                executes += 1
            else:
                return False
            owed.append(_BATCH_OWES[t])
            pos = end
        srv = self._server_now() if self.tx else self.server  # session pooling: its own, always
        if srv is None:
            return False
        if unnamed and (self.relay.unnamed is None or srv.unnamed != self.relay.unnamed):
            return False  # parsed again there first, or closed there: the general path does
        if bind >= 0:
            renamed = self._renamed_bind(data, bind, srv)
            if renamed is None:
                return False
            data = renamed
        if parse is not None:
            self.relay.unnamed = srv.unnamed = parse
        queue = srv.replies.queue
        queue.extend(owed)
        queue.append(_BATCH_SYNC)
        self.app.stats.queries += executes
        s.relayed_batch()
        self.up.append(data)
        self.flush_up()
        return True

    def _renamed_bind(self, data: bytes, end: int, srv: ServerConn) -> bytes | None:
        """`data` with its first message, a Bind of a named statement to the unnamed portal
        (ending at `end`), under the statement's upstream name, when `srv` holds it already and
        nothing of the statement's is tracked (TxRelay.named's usual case, in place: no name
        to prepare first, no scan); None: the general path takes the batch."""
        nul = data.find(b"\0", 6, end)
        if nul < 0:
            return None
        prep = self.relay.txs.stmts.get(data[6:nul].decode("utf-8", "replace"))
        if prep is None or prep.stmts is not None or prep.srvname not in srv.txs.prepared:
            return None
        bind = m.frame(b"B", b"\0" + m.cstr(prep.srvname) + data[nul + 1 : end])
        return bind + data[end:]

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

    def handle_query(self, msg: bytes) -> None:
        """A whole Query message, by the general path (not the fast path's express lookup)."""
        self._handle(0x51, msg)

    def handle_messages(self, data: bytes) -> None:
        """Whole messages, by the general path (a fast path gave them back)."""
        msgs, _ = m.scan(data, self.framer.max_size)
        for t, s, e in msgs:
            self._handle(t, data[s:e])

    def resume_pending(self) -> None:
        """What the client sent while it waited, now in order."""
        if self.task is None and self.pending and self.s.phase is Phase.READY:
            self.start_task(self._noop())

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
                if self.admin:
                    return self.local.refuse_extended(t)
                try:
                    return self._extended(t, msg)
                except ProtocolViolation as unreadable:  # a body it cannot read: ERROR, skip to Sync
                    self._batch_error(unreadable)
                    return None
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
            self.relay.unnamed = srv.unnamed = None  # a simple Query drops the unnamed statement upstream
            self.up.append(msg)
            srv.expect(Expect(Reply.READY, self.s.batch))
            return None
        self.local.note_sql(msg, parse=False)  # statement_timeout may change
        if self.admin:
            return self.local.admin_query(m.Query.parse(msg[5:]).sql)
        if self.route is not None and self.route.query(self, msg):
            return None  # SET pgml_proxy.route, answered here
        if _PGML.search(msg, 5) is not None:
            sql = m.Query.parse(msg[5:]).sql
            if not self._passes_through(sql):
                return self.local.simple_query(sql, msg)
        if self.tx:
            return self._query(msg)
        return self._forward(t, msg, Reply.READY)

    def _passes_through(self, sql: str) -> bool:
        """A Query that names pgml but calls none of it (the planner decides): relayed as bytes."""
        check = getattr(self.app.handler, "passes_through", None)
        if check is None:
            return False
        try:
            return bool(check(sql))
        except Exception:  # the local path reports whatever is wrong with it
            return False

    def _server_now(self) -> ServerConn | None:
        """The server connection serving this client: its own, or one free now (None: none is)."""
        if self.server is not None:
            return self.server
        if self.route is not None:
            self.pool = self.route.pool(self)
        pool = self.pool
        assert pool is not None
        idle, key = pool.idle, self._want_key
        if idle and key is not None and self.tx:
            # Transaction pooling's every statement: the usual case in place, as no call costs
            # less (about a microsecond each on a busy CPU, and this runs once a transaction).
            # The warmest idle connection (Pool.try_acquire's first choice) carries this
            # client's settings already (TxRelay.settings' first test): it is taken and attached.
            conn = idle[-1]
            if (conn.applied is key and not conn.startup and not conn.closed
                    and conn.txs.settings == self.relay.txs.settings):
                idle.pop()
                pool.busy.add(conn)
                conn.client = self
                conn.internal = False
                self.server = conn
                return conn
        got = pool.try_acquire()
        if got is not None:
            self._attach(got)
        return got

    def _attach(self, conn: ServerConn) -> None:
        conn.client = self
        conn.internal = False
        self.server = conn
        # The client's settings, before anything of the client runs on it (it may have SET
        # something elsewhere since, or another client used this connection).
        key = self._want_key
        settings = self.relay.settings(conn, self.want, self.want_key() if key is None else key, self.s.batch)
        if settings:  # usually none: the connection carries them already
            self._send(conn, settings)

    def _relayed(self, t: int, msg: bytes, decide: Callable[[ServerConn], Out]) -> Step:
        """Carry out TxRelay's decision for message `msg` on the server connection serving this
        client now, or once one is free."""
        srv = self._server_now()
        if srv is None:
            return self._forward_later(t, msg)
        self._send(srv, decide(srv))
        return None

    def _send(self, srv: ServerConn, out: Out) -> None:
        """Carry out a TxRelay decision: each message upstream, in order, owing its reply."""
        for data, expect in out:
            if data is not None:
                self.up.append(data)
                self.s.forwarded(expect.terminals)
            srv.expect(expect)

    def want_key(self) -> tuple[tuple[str, str], ...]:
        """`want` as one shared object for every client that wants the same: a server connection
        that carries it (`ServerConn.applied`) needs no comparison, whoever used it last."""
        if self._want_key is None:
            self._want_key = self.app.settings_key(self.want)
        return self._want_key

    def set_want(self, want: dict[str, str]) -> None:
        self.want = want
        self._want_key = None

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

    def _forward(self, t: int, msg: bytes, terminals: Reply, track: Tracker | None = None) -> Step:
        srv = self._server_now()
        if srv is None:
            return self._forward_later(t, msg)
        # Session pooling keeps the client's unnamed statement, to parse it again before its next
        # Bind or Describe if the proxy's own requests replace it meanwhile (`_forward_named`).
        if t == 0x50 and msg[5:6] == b"\0" and not self.tx:
            track = UnnamedChange(self.relay, srv, msg)
        self.up.append(msg)
        srv.expect(Expect(terminals, self.s.batch, track=track))
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
            if self.relay.portal_scan:
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
                if msg[5] == 0:  # the client's unnamed statement is a local one now
                    self.relay.unnamed = self.relay.unnamed_scan = None
                return local.parse(m.Parse.parse(msg[5:]))
            if not self.tx and not local.stmts:
                return self._forward(0x50, msg, Reply.PARSE)
            return self._parse(msg)
        if not self.tx and not local.stmts and not local.portals:
            return self._forward_named(t, msg)
        if (t == 0x42 and msg[5:7] == b"\0\0" and self.relay.unnamed_scan is None and not local.stmts
                and not local.portals):  # Bind of the unnamed statement to the unnamed portal
            return self._bind_unnamed(msg)
        return self._named(t, msg)

    def _parse_unnamed(self, msg: bytes) -> Step:
        """`_parse` of the unnamed statement whose text `plain` clears: no name, nothing to scan."""
        if not self.tx:
            return self._forward(0x50, msg, Reply.PARSE)
        return self._relayed(0x50, msg, lambda srv: self.relay.parse_unnamed(msg, srv, self.s.batch))

    def _forward_named(self, t: int, msg: bytes) -> Step:
        """Session pooling: a Bind, Describe or Close, forwarded. One of the unnamed statement
        finds upstream what the client left there: its own statement, parsed again if the
        proxy's own requests replaced it (`hold`), or none (closed first upstream, so Postgres
        answers 26000 as it would the client alone)."""
        srv = self.server
        if srv is not None and _of_unnamed(t, msg, 0, len(msg)):
            if t == 0x43:
                return self._forward(t, msg, Reply.CLOSE, UnnamedChange(self.relay, srv, None))
            out: Out = []
            self.relay.unnamed_again(srv, self.s.batch, out)
            self._send(srv, out)
        return self._forward(t, msg, Reply.to(t))

    def _bind_unnamed(self, msg: bytes) -> Step:
        """`_named` for a Bind of the unnamed statement to the unnamed portal, in transaction mode."""
        return self._relayed(0x42, msg, lambda srv: self.relay.bind_unnamed(msg, srv, self.s.batch))

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
        path = self.want.get("search_path") or self.relay.txs.settings.get("search_path", "")
        out, error = self.relay.parse(msg, p, srv, self.s.batch, path)
        self._send(srv, out)
        if error is not None:
            self._batch_error(error)
        return None

    def _batch_error(self, exc: PgError) -> None:
        """An error of the proxy's own in an extended batch: sent in order, then skip to Sync."""
        self.app.stats.errors += 1
        fields = exc.fields
        if fields["S"] == "FATAL":  # (08P01's usual severity) the session goes on: an ERROR, as Postgres's
            fields = {**fields, "S": "ERROR", "V": "ERROR"}
        self.reply(m.error_message(fields))
        self.s.failed()

    def _query(self, msg: bytes) -> Step:
        """A simple Query in transaction mode: put the server in step with the names it uses."""
        return self._relayed(0x51, msg, lambda srv: self.relay.query(msg, srv, self.s.batch))

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
            return self._forward_named(t, msg)
        rest, batch = msg[5 + r.pos :], self.s.batch
        return self._relayed(t, msg, lambda srv: self.relay.named(t, msg, portal, stmt, rest, srv, batch))

    def _execute(self, msg: bytes) -> Step:
        return self._relayed(0x45, msg, lambda srv: self.relay.execute(msg, srv, self.s.batch))

    def _sync(self) -> Step:
        srv = self.server
        batch = self.s.batch
        if self.s.sync(srv is not None) is SyncAnswer.FORWARD:
            assert srv is not None
            self.up.append(m.SYNC)
            srv.expect(Expect(Reply.READY, batch, sync=True))
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

    def server_param(self, name: str, value: str) -> None:
        if name not in UNSETTABLE and self.want.get(name) != value:
            self.want[name] = value
            self._want_key = None
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
        if not self.tx or srv is None or self.pool is None or not self.s.may_release(
                len(srv.replies.queue), srv.replies.tx_status, srv.internal):
            return
        for data, expect in self.relay.before_release(self.s.batch, self._captured):
            srv.expect(expect)
            srv.send(data or b"")
            srv.unnamed = None  # a simple Query drops the unnamed statement upstream
            return
        if self.route is not None and self.route.lsn_owed:  # read-your-writes: where it committed
            self.route.lsn_owed = False
            srv.expect(Expect(Reply.READY, self.s.batch, Swallow.ALL, track=txs.Capture(self.route.lsn_read)))
            srv.send_query(LSN_SQL)
            return
        self.server = None
        srv.client = None
        self.pool.release(srv)

    def server_ready(self) -> None:
        """A ReadyForQuery ended all that was owed: in transaction pooling the server
        connection may go back (session pooling has nothing to do then). This runs once a
        transaction, so the usual case is done in place, as no call costs less: the client is
        between transactions (Session.may_release's test, nothing owed), nothing runs before
        the release (TxRelay.before_release's), and no one waits for the pool (Pool.release's
        usual case). Anything else: `maybe_release`."""
        if not self.tx:  # (the general relay calls it in both modes)
            return
        srv, pool, relay, s = self.server, self.pool, self.relay, self.s
        if (srv is None or pool is None or pool.waiters or srv.internal or s.holding or s.sync_owed
                or srv.replies.tx_status != "I" or relay.temp_objects or relay.txs.dirty
                or self.route is not None or srv.closed or srv.replies.queue):
            self.maybe_release()
            return
        self.server = None
        srv.client = None
        pool.busy.discard(srv)
        srv.used_at = time.monotonic()
        pool.idle.append(srv)

    def _captured(self, rows: list[bytes]) -> None:
        srv = self.server
        values = [m.DataRow.parse(body).values for body in rows]
        got = txs.captured(((_text(v[0]), _text(v[1])) for v in values), srv.params if srv else ())
        self.relay.txs.settings = got
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
