"""Server connections: the proxy playing the client to the upstream Postgres.

Owns `ServerConn` (an asyncio Protocol: login, then either relaying the upstream's
responses to the attached client or handing them to the proxy's own requests). What
each forwarded message still owes, the transaction status and what reaches the client
are `proxy.session.Replies`' (sans-IO); this adapter reads, writes and calls back the
client. Also `connect` (TCP or unix socket, TLS, md5/SCRAM via `proxy.auth`) and
the proxy's own request/response reads (`run_simple`), the settings SQL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from core.datarows import uniform_run
from core.errors import ConnectionFailure, PgError, ProtocolViolation
from core.errors import SqlclientUnableToEstablishSqlconnection as CannotConnect
from core.interfaces import QueryResult, WireValue
from proxy import messages as m
from proxy.auth import UpstreamAuthenticator
from proxy.session import Expect, Replies
from proxy.txstate import ServerTx

log = logging.getLogger("pgml_proxy.backend")
_ids = itertools.count(1)

# Startup parameters beyond user and database, in the client's order: (name, value) pairs.
Startup = tuple[tuple[str, str], ...]



class Client(Protocol):
    """What a server connection needs of the client it is attached to (frontend.Frontend)."""

    tx: bool  # transaction pooling: a ReadyForQuery may give the connection back (server_ready)

    def write(self, data: bytes | bytearray) -> None: ...
    def server_error(self, batch: int) -> None: ...
    def server_ready(self) -> None: ...
    def server_param(self, name: str, value: str) -> None: ...
    def server_lost(self, conn: ServerConn) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect upstream (from the DSN)."""

    host: str
    port: int
    user: str
    password: str | None
    database: str
    sslmode: str = "disable"

    @property
    def unix_path(self) -> str | None:
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


def parse_dsn(dsn: str, sslmode: str = "prefer") -> Target:
    """A libpq URL or key=value string as a Target; ConfigError-free (dsn checked at start)."""
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(dsn)
    host = str(d.get("host") or "/tmp").split(",")[0]
    port = int(str(d.get("port") or 5432).split(",")[0])
    mode = str(d.get("sslmode") or sslmode)
    if host.startswith("/") and mode == "prefer":
        mode = "disable"  # unix sockets do not speak TLS
    return Target(host, port, str(d.get("user") or "postgres"),
                  None if d.get("password") is None else str(d.get("password")),
                  str(d.get("dbname") or d.get("user") or "postgres"),
                  "disable" if mode == "allow" else mode)


# An inbox entry of whole DataRow messages (type byte and length included), back to back.
ROW_BLOCK = 0x144


class ServerConn(asyncio.Protocol):
    """One upstream connection. Relays to `client` unless `internal`, when responses queue up."""

    def __init__(self, database: str, user: str, startup: Startup = ()) -> None:
        self.id = next(_ids)
        self.database, self.user = database, user
        self.startup = startup  # the client's startup parameters it was opened with (session mode)
        self.transport: asyncio.Transport | None = None
        self.framer = m.Framer()
        self.params: dict[str, str] = {}
        self.extra: dict[str, str] = {}  # settings we applied that the server does not report
        self.pid = 0
        self.secret = 0
        self.client: Client | None = None
        # The client settings (Frontend.want_key) it is known to carry; None after any change.
        self.applied: tuple[tuple[str, str], ...] | None = None
        self.replies = Replies()  # what is owed, the transaction status (proxy.session)
        self.internal = True  # until login completes, responses go to `inbox`
        self.inbox: deque[tuple[int, bytes]] = deque()
        # While the planner streams a table through a model: runs of DataRows reach `inbox`
        # as one (ROW_BLOCK, whole messages) entry, read column-wise, not one entry per row.
        self.row_blocks = False
        self._wakeup: asyncio.Future[None] | None = None
        self._idle_event: asyncio.Event | None = None
        self.txs = ServerTx()  # transaction mode: the named statements and settings it holds
        self.unnamed: object = None
        self.closed = False
        self.created_at = self.used_at = time.monotonic()
        self.host = ""
        self.target: Target | None = None  # where it is connected (cancel requests go there)
        self._ssl_answer: asyncio.Future[bytes] | None = None

    @property
    def tx_status(self) -> str:
        return self.replies.tx_status

    @tx_status.setter
    def tx_status(self, status: str) -> None:
        self.replies.tx_status = status

    @property
    def said_fatal(self) -> bool:
        """The upstream sent a FATAL (relayed): the client needs no other reason for the close."""
        return self.replies.said_fatal

    # --- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._idle_event is not None:
            self._idle_event.set()
        if self.client is not None and not self.internal:
            self.client.server_lost(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._ssl_answer is not None and not self._ssl_answer.done():
            self._ssl_answer.set_result(data[:1])
            return
        client = self.client
        if client is not None and not self.internal and not self.framer.buf and self._ssl_answer is None:
            # Every reply of a pass-through statement: framed and decided in one pass.
            relayed = self.replies.relay(data, self.framer.max_size)
            if relayed is not None:
                used, ready = relayed
                if used:
                    client.write(data if used == len(data) else data[:used])
                if used < len(data):
                    self.framer.feed(data[used:])
                if not self.replies.queue:
                    if self._idle_event is not None:
                        self._idle_event.set()
                    if ready and client.tx:  # transaction pooling: the connection may go back now
                        client.server_ready()
                return
            if self._fast_relay(data):
                return
        fr = self.framer
        fr.buf += data
        bulk = 0
        if self.row_blocks and self.internal:
            bulk = uniform_run(fr.buf)  # rows of one length: framed in one vectorised pass
            if bulk:
                self.inbox.append((ROW_BLOCK, bytes(fr.buf[:bulk])))
                fr.drop(bulk)
        try:
            msgs, used = fr.scan()
        except ProtocolViolation as exc:
            log.error("server conn %d: %s", self.id, exc)
            self.close()
            return
        if not msgs:
            if bulk:
                self._wake()
            return
        if not self.internal and self.client is None:  # idle in the pool: nobody is owed anything
            for t, s, e in msgs:
                if t == 0x53:
                    self._param(bytes(fr.buf[s + 5 : e]))
                elif t == 0x45:
                    log.warning("server conn %d (idle) got: %s", self.id,
                                m.ErrorResponse.parse(bytes(fr.buf[s + 5 : e])).fields.get("M"))
            fr.drop(used)
            return
        if self.internal or self.client is None:
            buf = fr.buf
            run = -1  # where the current run of DataRows starts, when grouping them
            for t, s, e in msgs:
                if t == 0x44 and self.row_blocks:
                    if run < 0:
                        run = s
                    run_end = e
                    continue
                if run >= 0:
                    self.inbox.append((ROW_BLOCK, bytes(buf[run:run_end])))
                    run = -1
                if t == 0x41 and self.client is not None:  # NotificationResponse: the client's
                    self.client.write(buf[s:e])
                    continue
                if t == 0x53:
                    self._param(bytes(buf[s + 5 : e]))
                    if self.client is not None:
                        self.client.write(buf[s:e])
                self.inbox.append((t, bytes(buf[s + 5 : e])))
            if run >= 0:
                self.inbox.append((ROW_BLOCK, bytes(buf[run:run_end])))
            fr.drop(used)
            self._wake()
            return
        self._relay(fr.buf, msgs, used)
        fr.drop(used)

    def _fast_relay(self, data: bytes) -> bool:
        """Relay mode with nothing buffered (the caller checked), replies that need `feed`'s
        decisions: read in place, without copying. False: take the slow path."""
        try:
            msgs, used = m.scan(data, self.framer.max_size)
        except ProtocolViolation:
            return False
        if msgs:
            self._relay(data, msgs, used)
        if used < len(data):
            self.framer.feed(data[used:])
        return True

    # --- relaying ------------------------------------------------------------------------
    def _relay(self, buf: bytes | bytearray, msgs: list[tuple[int, int, int]], used: int) -> None:
        """Relay upstream responses as `Replies` decides, and tell the client what happened."""
        client = self.client
        assert client is not None
        fed = self.replies.feed(buf, msgs, used)
        if fed.params is not None:
            self.applied = None
            for name, value in fed.params:
                self.params[name] = value
                client.server_param(name, value)
        if fed.failed is not None:
            for batch in fed.failed:
                client.server_error(batch)
        if fed.data:
            client.write(fed.data)
        if not self.replies.queue:
            if self._idle_event is not None:
                self._idle_event.set()
            if fed.ready:
                client.server_ready()

    def expect(self, entry: Expect) -> None:
        """Queue an owed response; a synthetic one with nothing ahead goes to the client at once."""
        now = self.replies.expect(entry)
        if now is not None:
            assert self.client is not None
            self.client.write(now)

    async def idle(self) -> None:
        """Wait until every owed response has been relayed (asking the upstream to flush)."""
        while self.replies.queue and not self.closed:
            if self.replies.owes_flush():
                self.send(m.FLUSH)
            self._idle_event = asyncio.Event()
            await self._idle_event.wait()
        self._idle_event = None
        if self.closed:
            raise ConnectionFailure("the upstream connection was lost")

    def _param(self, body: bytes) -> None:
        p = m.ParameterStatus.parse(body)
        self.applied = None
        self.params[p.name] = p.value
        if self.client is not None and not self.internal:
            self.client.server_param(p.name, p.value)

    # --- the proxy's own requests --------------------------------------------------------
    def send(self, data: bytes | bytearray) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_query(self, sql: str) -> None:
        """A simple Query of the proxy's own; it drops the unnamed statement upstream, so the
        client's is parsed again before its next Bind."""
        self.send(m.Query(sql).encode())
        self.unnamed = None

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def recv(self) -> tuple[int, bytes]:
        """The next response (type, body) while `internal`; ConnectionFailure when the link drops."""
        while not self.inbox:
            if self.closed:
                raise ConnectionFailure("the upstream connection was lost")
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        return self.inbox.popleft()

    async def run_simple(self, sql: str) -> list[QueryResult]:
        """Run a simple Query on this connection (which must be `internal`); raises PgError."""
        self.send_query(sql)
        return await self.read_results()

    async def read_results(self) -> list[QueryResult]:
        results: list[QueryResult] = []
        cur: QueryResult | None = None
        notices: list[dict[str, str]] = []
        error: PgError | None = None
        rows: list[list[WireValue]] = []
        while True:
            t, body = await self.recv()
            if t == 0x54:
                rows = []
                cur = QueryResult(list(m.RowDescription.parse(body).columns), rows, "", notices)
            elif t == 0x44:
                if cur is not None:
                    rows.append(list(m.DataRow.parse(body).values))
            elif t in (0x43, 0x49):
                tag = m.CommandComplete.parse(body).tag if t == 0x43 else ""
                if cur is None:
                    cur = QueryResult(None, [], tag, notices)
                cur.command_tag = tag
                results.append(cur)
                cur, notices = None, []
            elif t == 0x45:
                error = PgError.from_fields(m.ErrorResponse.parse(body).fields)
            elif t == 0x4E:
                notices.append(dict(m.ErrorResponse.parse(body, True).fields))
            elif t == 0x47:  # CopyIn started by SQL that has no data to give: refuse it
                self.send(m.frame(b"f", m.cstr("COPY FROM STDIN is not available here")))
            elif t == 0x5A:
                self.tx_status = chr(body[0])
                if error is not None:
                    raise error
                return results

    async def sync_after_error(self, error: PgError) -> PgError:
        """Send Sync and read up to ReadyForQuery, so the connection is usable again."""
        await self.sync()
        return error

    async def sync(self) -> None:
        """Send Sync and drop every response up to its ReadyForQuery (which sets tx_status)."""
        self.send(m.SYNC)
        while True:
            t, body = await self.recv()
            if t == 0x5A:
                self.tx_status = chr(body[0])
                return

    def cancel_key(self) -> tuple[int, int]:
        return self.pid, self.secret

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.send(m.TERMINATE)
            self.transport.close()
        self.closed = True


async def connect(
    target: Target, database: str, user: str, password: str | None,
    ssl_context: Callable[[str], ssl.SSLContext | None] | None = None, timeout: float = 10.0,
    startup: Startup = (),
) -> ServerConn:
    """Open and log in a server connection as `user` to `database` with the further startup
    parameters `startup`; raises PgError (class 08/28/3D, or what the upstream says of them)."""
    loop = asyncio.get_running_loop()
    conn = ServerConn(database, user, startup)
    try:
        async with asyncio.timeout(timeout):
            if target.unix_path:
                await loop.create_unix_connection(lambda: conn, target.unix_path)
            else:
                await loop.create_connection(lambda: conn, target.host, target.port)
            if target.sslmode != "disable" and ssl_context is not None:
                await _start_tls(conn, target, ssl_context(target.sslmode))
            await _server_login(conn, database, user, password)
    except OSError as exc:
        conn.close()
        where = target.unix_path or f"{target.host}:{target.port}"
        raise CannotConnect(f"cannot reach the upstream Postgres at {where}: {exc}") from None
    except TimeoutError:
        conn.close()
        raise CannotConnect(f"the upstream did not answer within {timeout} s") from None
    except BaseException:
        conn.close()
        raise
    conn.internal = False
    conn.host, conn.target = target.host, target
    return conn


async def _start_tls(conn: ServerConn, target: Target, ctx: ssl.SSLContext | None) -> None:
    if ctx is None:
        return
    conn._ssl_answer = asyncio.get_running_loop().create_future()
    conn.send(m._I32.pack(8) + m._I32.pack(m.SSL_REQUEST))
    answer = await conn._ssl_answer
    conn._ssl_answer = None
    if answer != b"S":
        if target.sslmode == "require":
            raise CannotConnect("the upstream refused TLS and upstream sslmode is require")
        return
    assert conn.transport is not None
    tr = await asyncio.get_running_loop().start_tls(conn.transport, conn, ctx, server_hostname=target.host)
    conn.transport = cast(asyncio.Transport, tr)


async def _server_login(conn: ServerConn, database: str, user: str, password: str | None) -> None:
    conn.send(m.StartupMessage({"user": user, "database": database, **dict(conn.startup)}).encode())
    auth = UpstreamAuthenticator(user, password)
    while True:
        t, body = await conn.recv()
        if t == 0x52:
            for msg in auth.feed(body).messages:
                conn.send(msg)
        elif t == 0x4B:
            key = m.BackendKeyData.parse(body)
            conn.pid, conn.secret = key.pid, key.secret
        elif t == 0x45:
            raise PgError.from_fields(m.ErrorResponse.parse(body).fields)
        elif t == 0x5A:
            conn.tx_status = chr(body[0])
            return
        elif t == 0x76:
            pass  # NegotiateProtocolVersion: we asked for 3.0, nothing to adjust


async def send_cancel(target: Target, pid: int, secret: int) -> None:
    """Ask the upstream to cancel what backend `pid` runs (a fresh connection, as libpq does)."""
    try:
        async with asyncio.timeout(5):
            if target.unix_path:
                _, writer = await asyncio.open_unix_connection(target.unix_path)
            else:
                _, writer = await asyncio.open_connection(target.host, target.port)
            writer.write(m.CancelRequest(pid, secret).encode())
            await writer.drain()
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to backend %d failed: %s", pid, exc)
