"""What the proxy answers itself for one client: statements that mention pgml, and the admin db.

Owns the client's locally prepared statements and portals (from the planner's
`parse`/`bind`), running planner and admin work as a cancellable task, and turning
what it raises into an ErrorResponse (then skip-to-Sync in the extended protocol).
Every local answer waits until the upstream has delivered all it owed the client, so
responses stay in the order the client sent its messages.

Also owns each local statement's stop scope (`core.stop.Stop`: a CancelRequest, the
client vanishing, its statement_timeout) and what the proxy knows of the client's
statement_timeout: the value read on its server connection, kept until a statement the
client sends may change it (`note_sql`). A change that only lasts for a transaction
(inside a block, SET LOCAL, set_config) or comes in a Parse (whose Executes the proxy
does not read) makes every later pgml statement read the setting afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from core.datarows import encode_data_row
from core.errors import FeatureNotSupported, InternalError, PgError, QueryCanceled
from core.interfaces import (
    CallContext,
    Column,
    NowStatement,
    Portal,
    PreparedStatement,
    StatementHandler,
    WireValue,
)
from core.stop import Stop
from proxy import messages as m
from proxy.session import Phase
from proxy.upstream import HeldUpstream

# Fails on purpose: the only way to put an open transaction block into the aborted state.
_ABORT_BLOCK = "DO $$BEGIN RAISE EXCEPTION 'a pgml statement failed in pgml-proxy'; END$$"

# Statements that may change statement_timeout, and those whose change may not last the session.
_TIMEOUT_SQL = re.compile(rb"statement_timeout|reset\s+all|discard\s+all", re.IGNORECASE)
_NOT_SESSION = re.compile(rb"\blocal\b|\bbegin\b|\bstart\s+transaction\b|set_config", re.IGNORECASE)

# The fast path's constant replies, and how many Query messages it keeps, of what length at
# most (more are forgotten all at once: a bound for clients whose every statement differs).
_SELECT_1 = m.CommandComplete("SELECT 1").encode()
_READY = {s: m.ReadyForQuery(s).encode() for s in "ITE"}
_EXPRESS_MAX = 1024
_EXPRESS_LEN = 4096
_AGAIN_MAX = 32  # per client (`LocalStatements.again`)

T = TypeVar("T")
# What a message handler returns: the coroutine to run when it must wait, None when done now.
Step = Coroutine[Any, Any, None] | None

if TYPE_CHECKING:
    from proxy.frontend import Frontend
    from proxy.sink import ClientSink

log = logging.getLogger("pgml_proxy.local")


class Cork:
    """A local statement's replies gathered into few writes: what is written in one turn of the
    event loop and the next goes out in one send (a one-row predict's RowDescription, DataRow,
    CommandComplete and ReadyForQuery: one system call instead of four; BindComplete, the rows,
    CommandComplete and ReadyForQuery in the extended protocol). Then it lets go: streamed
    output (notices, transform_stream's pieces) waits two loop turns at most, 64 KiB goes at
    once, and every write goes through Frontend.write, so the order never changes."""

    _LIMIT = 1 << 16

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.buf = bytearray()
        self.scheduled = False

    def hold(self, data: bytes | bytearray) -> bool:
        self.buf += data
        if len(self.buf) >= self._LIMIT:
            self.flush()
        elif not self.scheduled:
            self.scheduled = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._later)
        return True

    def _later(self) -> None:
        self.scheduled = False
        self.release()

    @staticmethod
    def on(fe: Frontend) -> Cork:
        """The client's cork: the one already holding, or a new one."""
        if fe.cork is None:
            fe.cork = Cork(fe)
        return fe.cork

    def flush(self) -> None:
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            transport = self.fe.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def release(self) -> None:
        """Send what is held and stop holding."""
        if self.fe.cork is self:
            self.fe.cork = None
        self.flush()


Finish = Callable[[list[WireValue] | None], None]


@functools.lru_cache(maxsize=256)
def _row_description(columns: tuple[Column, ...]) -> bytes:
    """A fast-path portal's RowDescription, described again at each of its Executes."""
    return m.RowDescription(columns).encode()


class _Again(NamedTuple):
    """A batch `answered_batch` answered: its statement (by name, and the object the name meant
    then), its portal, and its replies before the row (BindComplete, and RowDescription when
    it described the portal)."""

    statement: str
    stmt: PreparedStatement
    portal: Portal
    head: bytes


class NowBatch:
    """The fast-path statements of every client that came in one turn of the event loop,
    answered together when the turn ends (`StatementHandler.answer_many`: one model call for
    the rows of one model). With many clients sending one-row predicts, each turn reads a
    statement from most of them, so the model's per-call cost and the runtime's per-call steps
    are paid once. Each client waits meanwhile (its `task` is a future: what it sends queues)."""

    def __init__(self, handler: Callable[[], StatementHandler | None]) -> None:
        self._handler = handler
        self._items: list[NowStatement | Portal] = []
        self._finish: list[tuple[LocalStatements, Finish]] = []

    def add(self, local: LocalStatements, item: NowStatement | Portal, finish: Finish) -> None:
        if not self._items:
            asyncio.get_running_loop().call_soon(self._flush)
        self._items.append(item)
        self._finish.append((local, finish))

    def _flush(self) -> None:
        items, finish = self._items, self._finish
        self._items, self._finish = [], []
        handler = self._handler()
        rows: list[list[WireValue] | None] = [None] * len(items)
        if handler is not None:
            try:
                rows = handler.answer_many(items)
            except Exception:  # a bug: the general path answers each, and reports what is wrong
                log.exception("the fast path failed for %d statements", len(items))
        for (local, done), row in zip(finish, rows, strict=True):
            try:
                done(row)
            except Exception as exc:  # one client's failure is that client's
                log.exception("client %d: unexpected failure", local.fe.id)
                local.fe.fatal(InternalError(f"pgml-proxy internal error: {exc}"))


class LocalStatements:
    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.stmts: dict[str, PreparedStatement] = {}
        self.portals: dict[str, Portal] = {}
        # Portals closed or replaced by the client, to release upstream before the next local work.
        self.stale: list[Portal] = []
        self.current: asyncio.Future[None] | None = None
        self.upstream = HeldUpstream(fe.hold, self._status)
        self.scope: Stop | None = None  # the running local statement's
        self.timeout: float | None = None  # the client's statement_timeout (ms); None: unknown
        self.timeout_always_read = False
        # Extended batches the fast path answered, by their bytes (`answered_batch_again`).
        self.again: dict[bytes, _Again] = {}

    def note_sql(self, msg: bytes, parse: bool) -> None:
        """A Query or Parse message of the client's: forget the statement_timeout it may change."""
        # Substring tests first (a fraction of the regex's cost): most messages match none.
        if not (b"imeout" in msg or b"IMEOUT" in msg or b"all" in msg or b"ALL" in msg or b"All" in msg):
            return
        if _TIMEOUT_SQL.search(msg, 5) is None:
            return
        self.timeout = None
        if parse or self._status() != "I" or _NOT_SESSION.search(msg, 5) is not None:
            self.timeout_always_read = True

    def _timeout_read(self, ms: float) -> None:
        self.timeout = ms

    def context(self, sink: ClientSink) -> CallContext:
        """The CallContext of the running local statement: its stop scope and timeout."""
        ctx = self.fe.context(sink.notice_text, sink.warning_text)
        if self.scope is not None:
            ctx.stop = self.scope
        ctx.statement_timeout = None if self.timeout_always_read else self.timeout
        ctx.timeout_read = self._timeout_read
        return ctx

    def _status(self) -> str:
        return self.fe.server.tx_status if self.fe.server is not None else "I"

    def _handler(self) -> StatementHandler:
        handler = self.fe.app.handler
        if handler is None:
            raise FeatureNotSupported(
                "pgml planner not available",
                hint="this pgml-proxy runs without its planner; see the log for why it did not load",
            )
        return handler

    def has_portal(self, execute_msg: bytes) -> bool:
        return m.Execute.parse(execute_msg[5:]).portal in self.portals

    def has_portal_name(self, name: str) -> bool:
        return name in self.portals

    def forget_statement(self, name: str) -> None:
        self.stmts.pop(name, None)

    def forget_portal(self, name: str) -> None:
        portal = self.portals.pop(name, None)
        if portal is not None and portal.holds_upstream:
            self.stale.append(portal)

    async def _release_stale(self) -> None:
        stale, self.stale = self.stale, []
        for portal in stale:
            await portal.close(self.upstream)

    def cancel(self) -> None:
        """A CancelRequest, or the client is gone: stop the running local statement's work.

        Its scope is stopped (model work ends at once, with 57014). The task itself is cancelled
        only while it holds no server connection: cutting an exchange with the upstream in the
        middle would leave the connection out of step (the proxy cancels that query upstream).
        """
        if self.scope is not None:
            self.scope.stop()
        if self.current is not None and not self.fe.s.holding:
            self.current.cancel()

    async def _guard(self, work: Callable[[], Awaitable[None]], extended: bool) -> None:
        """Run `work` once earlier responses are out; its errors become an ErrorResponse."""
        fe = self.fe
        try:
            if fe.server is not None:
                await fe.server.idle()
            if extended and fe.s.skipping:
                return
            self.scope = Stop()
            self.current = asyncio.ensure_future(work())
            await self.current
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            await self._fail(QueryCanceled("canceling statement due to user request"), extended)
        except PgError as exc:
            await self._fail(exc, extended)
        except Exception as exc:
            log.exception("planner work failed for client %d", fe.id)
            await self._fail(
                InternalError(f"pgml-proxy internal error: {type(exc).__name__}: {exc}"), extended
            )
        finally:
            self.current = None
            if self.scope is not None:
                self.scope.close()
                self.scope = None
            fe.unhold()

    async def _fail(self, exc: PgError, extended: bool) -> None:
        """Report a failed pgml statement; inside a transaction block, abort it first.

        In Postgres any failed statement aborts the block (25P02 until ROLLBACK). A failure in the
        proxy (a model, the planner) never reached the upstream, so the block is aborted there,
        and the ReadyForQuery that follows says 'E'.
        """
        if self.upstream.transaction_status == "T":  # 'I' when no server connection is held
            with contextlib.suppress(PgError):
                await self.upstream.simple(_ABORT_BLOCK)
        self._error(exc, extended)

    def _error(self, exc: PgError, extended: bool) -> None:
        self.fe.app.stats.errors += 1
        self.fe.write(m.error_message(exc.fields))
        if extended:
            self.fe.s.failed()

    def _finish_simple(self) -> None:
        fe = self.fe
        fe.write(m.ReadyForQuery(self._status()).encode())
        fe.maybe_release()

    # --- the fast path ---------------------------------------------------------------------
    def _may_answer_now(self, extended: bool) -> bool:
        """Whether a local answer may be written at once, in the caller's turn, with no task and
        no stop scope (the work then takes tens of microseconds: nothing could stop it sooner):
        nothing is owed to the client before it, no error is being skipped, no local work runs
        or waits to release the upstream, the block has not failed, and the client's
        statement_timeout is known (the planned path reads it upstream first otherwise)."""
        fe = self.fe
        srv = fe.server
        return (
            (srv is None or (not srv.replies and not srv.closed))
            and not (extended and fe.s.skipping)
            and self.current is None
            and not self.stale
            and self.timeout is not None
            and not self.timeout_always_read
            and self._status() != "E"
        )

    def _now(self, answer: Callable[[], T | None]) -> T | None:
        """The fast path's answer, or None: it cannot answer now, or failed (a bug: the planned
        path runs the statement again and reports what is wrong)."""
        try:
            return answer()
        except Exception:
            log.exception("the fast path failed for client %d", self.fe.id)
            return None

    def _answered_now(self, sql: str, msg: bytes) -> bool:
        """A simple Query answered by the planner's fast path (StatementHandler.now_statement);
        the statement is kept for the same Query message (`answered_again`) when nothing else
        of the session looks at that message (`note_sql`)."""
        handler = self.fe.app.handler
        if handler is None or not self._may_answer_now(False):
            return False
        st = self._now(lambda: handler.now_statement(sql))
        if st is None:
            return False
        head = m.RowDescription(tuple(st.columns)).encode()
        if not self._answer(st, head):
            return False
        kept = self.fe.app.express
        if len(msg) <= _EXPRESS_LEN and _TIMEOUT_SQL.search(msg, 5) is None:
            if len(kept) >= _EXPRESS_MAX:
                kept.clear()
            kept[msg] = (st, head)
        return True

    def answered_again(self, msg: bytes) -> bool:
        """A whole Query message answered by the fast path before, answered again with no
        parsing, planning or encoding of its columns (Frontend.data_received's first test for
        a Query that calls pgml). It is answered at the end of this turn of the event loop,
        with those of every other client that came in the same turn (`NowBatch`): one model
        call for all. False: nothing was done, the general path takes it."""
        found = self.fe.app.express.get(msg)
        if found is None or not self._may_answer_now(False):
            return False
        st, head = found
        held = self._hold()

        def finish(row: list[WireValue] | None) -> None:
            if not self._unheld(held):
                return
            fe = self.fe
            if row is None:
                fe.handle_query(msg)  # the general path, which reports what is wrong
            else:
                fe.write(head + encode_data_row(row) + _SELECT_1 + _READY[self._status()])
                fe.maybe_release()
                stats = fe.app.stats
                stats.queries += 1
                stats.pgml_queries += 1
            fe.resume_pending()

        self.fe.app.now_batch.add(self, st, finish)
        return True

    def _hold(self) -> asyncio.Future[None]:
        """The client waits for this turn's batch: what it sends meanwhile queues in `pending`."""
        held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.fe.task = held
        return held

    def _unheld(self, held: asyncio.Future[None]) -> bool:
        """The batch is answered: False when the client went away meanwhile."""
        fe = self.fe
        if fe.task is not held or fe.s.phase is not Phase.READY:
            return False
        fe.task = None
        return True

    def _answer(self, st: NowStatement, head: bytes) -> bool:
        row = self._now(st.answer)
        if row is None:
            return False
        fe = self.fe
        fe.write(head + encode_data_row(row) + _SELECT_1 + _READY[self._status()])
        fe.maybe_release()
        return True

    def _bind_now(self, b: m.Bind) -> Portal | None:
        """The portal of a Bind to a local statement when the fast path may bind it now
        (nothing registered or written yet); None: the planned path binds it."""
        stmt = self.stmts.get(b.statement)
        old = self.portals.get(b.portal)
        if stmt is None or (old is not None and old.holds_upstream) or not self._may_answer_now(True):
            return None
        try:
            portal = stmt.bind_now(b.params, b.param_formats, b.result_formats)
        except Exception:  # its error, reported by the planned path
            return None
        if portal is not None:
            portal.name = b.portal
        return portal

    def _bound_now(self, b: m.Bind) -> bool:
        portal = self._bind_now(b)
        if portal is None:
            return False
        self.portals[b.portal] = portal
        Cork.on(self.fe)
        self.fe.write(m.BIND_COMPLETE)
        return True

    def answered_batch(self, b: m.Bind, describe: bool, data: bytes) -> bool:
        """A whole extended batch on a local statement, answered in one step: Bind to the
        unnamed portal, Describe of it when `describe`, Execute with no row limit, Sync (as
        pgbench -M prepared and drivers' prepared statements send them). Its replies go in one
        write, as the messages one by one would give them, when this turn's batch is answered
        (`NowBatch`, as for `answered_again`). False: nothing was done (nothing bound, nothing
        written), the general path takes every message (`data`)."""
        stmt = self.stmts.get(b.statement)
        portal = self._bind_now(b)
        if stmt is None or portal is None:
            return False
        columns = portal.describe_now() if describe else None
        if describe and columns is None:
            return False
        if not portal.may_execute_now():
            return False
        head = m.BIND_COMPLETE + (b"" if columns is None else _row_description(tuple(columns)))
        self._answer_batch(_Again(b.statement, stmt, portal, head), portal, data)
        return True

    def answered_batch_again(self, data: bytes) -> bool:
        """`answered_batch` for the exact bytes of a batch it answered before (a prepared
        statement executed again with the same parameters, or with none): the portal is bound
        again from the first one's parameters, with no parsing or checking of the Bind, and its
        replies' head is the first one's. False: nothing was done, `answered_batch` or the
        general path takes it."""
        found = self.again.get(data)
        if found is None or self.stmts.get(found.statement) is not found.stmt:
            return False  # (its statement was closed or replaced since)
        old = self.portals.get("")
        if (old is not None and old.holds_upstream) or not self._may_answer_now(True):
            return False
        self._answer_batch(found, found.portal.again(), data)
        return True

    def _answer_batch(self, entry: _Again, portal: Portal, data: bytes) -> None:
        held = self._hold()

        def finish(row: list[WireValue] | None) -> None:
            if not self._unheld(held):
                return
            fe = self.fe
            if row is None:
                fe.handle_messages(data)  # every message of the batch by the general path
            else:
                self.portals[""] = portal
                fe.app.stats.queries += 1
                fe.s.sync(fe.server is not None)  # nothing of the batch went upstream: answered here
                fe.write(entry.head + encode_data_row(row) + _SELECT_1 + _READY[self._status()])
                fe.maybe_release()
                kept = self.again
                if data not in kept:
                    if len(kept) >= _AGAIN_MAX:
                        kept.clear()
                    kept[data] = entry
            fe.resume_pending()

        self.fe.app.now_batch.add(self, portal, finish)

    def _described_now(self, name: str) -> bool:
        portal = self.portals.get(name)
        if portal is None or not self._may_answer_now(True):
            return False
        columns = portal.describe_now()
        if columns is None:
            return False
        self.fe.write(m.RowDescription(tuple(columns)).encode())
        return True

    def _executed_now(self, ex: m.Execute) -> bool:
        portal = self.portals.get(ex.portal)
        if portal is None or ex.max_rows or not self._may_answer_now(True):
            return False
        found = self._now(portal.execute_now)
        if found is None:
            return False
        row, tag = found
        Cork.on(self.fe)
        self.fe.write(encode_data_row(row) + m.CommandComplete(tag).encode())
        return True

    # --- simple protocol -----------------------------------------------------------------
    def simple_query(self, sql: str, msg: bytes) -> Step:
        """A Query calling pgml (`msg`, its text `sql`): answered in this turn when the fast path
        can (no task), else the coroutine that plans and runs it."""
        self.fe.app.stats.pgml_queries += 1
        return None if self._answered_now(sql, msg) else self._simple_query(sql)

    async def _simple_query(self, sql: str) -> None:
        fe = self.fe

        async def work() -> None:
            handler = self._handler()
            sink = fe.sink()
            await handler.simple_query(sql, self.upstream, sink, self.context(sink))

        cork = Cork.on(fe)
        try:
            await self._guard(work, extended=False)
            self._finish_simple()
        finally:
            cork.release()

    async def admin_query(self, sql: str) -> None:
        fe = self.fe

        async def work() -> None:
            from proxy import admin
            sink = fe.sink()
            for result in await admin.answer(sql, fe.app):
                if result.columns is not None:
                    await sink.row_description(result.columns)
                await sink.data_rows(result.rows)
                await sink.command_complete(result.command_tag)

        await self._guard(work, extended=False)
        fe.write(m.ReadyForQuery("I").encode())

    async def refuse_extended(self, t: int) -> None:
        async def work() -> None:
            raise FeatureNotSupported("the pgml_proxy admin database answers simple queries only")

        await self._guard(work, extended=True)

    # --- extended protocol ---------------------------------------------------------------
    async def parse(self, p: m.Parse) -> None:
        fe = self.fe
        fe.app.stats.pgml_queries += 1
        fe.relay.txs.stmts.pop(p.name, None)

        async def work() -> None:
            self.stmts[p.name] = await self._handler().parse(p.sql, p.param_oids)
            fe.write(m.PARSE_COMPLETE)

        await self._guard(work, extended=True)

    def bind(self, b: m.Bind) -> Step:
        return None if self._bound_now(b) else self._bind(b)

    async def _bind(self, b: m.Bind) -> None:
        async def work() -> None:
            stmt = self.stmts[b.statement]
            self.forget_portal(b.portal)
            await self._release_stale()
            portal = await stmt.bind(b.params, b.param_formats, b.result_formats)
            portal.name = b.portal
            self.portals[b.portal] = portal
            self.fe.write(m.BIND_COMPLETE)

        Cork.on(self.fe)
        await self._guard(work, extended=True)

    async def describe_statement(self, name: str) -> None:
        async def work() -> None:
            desc = await self.stmts[name].describe(self.upstream)
            out = m.ParameterDescription(tuple(desc.param_oids)).encode()
            out += m.NO_DATA if desc.columns is None else m.RowDescription(tuple(desc.columns)).encode()
            self.fe.write(out)

        await self._guard(work, extended=True)

    def describe_portal(self, name: str) -> Step:
        return None if self._described_now(name) else self._describe_portal(name)

    async def _describe_portal(self, name: str) -> None:
        async def work() -> None:
            cols = await self.portals[name].describe(self.upstream)
            self.fe.write(m.NO_DATA if cols is None else m.RowDescription(tuple(cols)).encode())

        await self._guard(work, extended=True)

    def execute(self, msg: bytes) -> Step:
        ex = m.Execute.parse(msg[5:])
        return None if self._executed_now(ex) else self._execute(ex)

    async def _execute(self, ex: m.Execute) -> None:
        fe = self.fe

        async def work() -> None:
            sink = fe.sink()
            portal = self.portals[ex.portal]
            suspended = await portal.execute(self.upstream, sink, self.context(sink), ex.max_rows)
            if suspended:
                fe.write(m.PORTAL_SUSPENDED)

        # Held until two loop turns after the first write: the Sync's ReadyForQuery joins.
        Cork.on(fe)
        await self._guard(work, extended=True)

    async def close(self, kind: bytes, name: str) -> None:
        async def work() -> None:
            if kind == b"S":
                self.stmts.pop(name, None)
            else:
                self.forget_portal(name)
                await self._release_stale()
            self.fe.write(m.CLOSE_COMPLETE)

        await self._guard(work, extended=True)
