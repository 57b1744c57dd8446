"""The StatementHandler the proxy calls: simple queries, Parse/Bind/Execute, the parse cache.

Owns settings validation, the bounded LRU of analysed statements (by text and
parameter OIDs), splitting a Query message into statements (those without runtime
pgml calls go upstream as the client wrote them), the implicit transaction of a
multi-statement Query, and portal suspension (max_rows) for the extended protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from core.errors import ObjectNotInPrerequisiteState, PgError, SyntaxError_, UndefinedParameter
from core.interfaces import (
    CallContext,
    Column,
    NowStatement,
    Portal,
    QueryResult,
    ResultSink,
    Runtime,
    StatementDescription,
    UpstreamSession,
    WireValue,
)
from core.settings import PlannerSettings
from planner.analyze import analyze
from planner.args import fold_array_literals
from planner.execute import (
    TEXT,
    Bound,
    Event,
    Executor,
    answer_now,
    answer_now_many,
    answerable_now,
    cursor_open,
    now_columns,
)
from planner.plan import StatementPlan
from planner.values import check_bind

_PORTALS = itertools.count(1)  # names the upstream cursors of row-limited portals
_FIRST_USER_OID = 16384  # FirstNormalObjectId: below it, OIDs of the built-in catalog


def validate(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The `[planner]` table with defaults applied (core.settings); raises ConfigError naming a bad key."""
    return dataclasses.asdict(PlannerSettings.from_mapping(settings))


_LARGE_SQL = 1 << 16  # statements longer than this are analysed off the event loop


class Handler:
    """Implements `core.interfaces.StatementHandler`."""

    def __init__(self, runtime: Runtime, settings: Mapping[str, Any]) -> None:
        cfg = validate(settings)
        self.executor = Executor(runtime, cfg["chunk_rows"], cfg["materialise_rows"], cfg["chunk_bytes"])
        self.cache_size = cfg["parse_cache_size"]
        self.ctas_embedding = str(cfg["ctas_embedding_type"])
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], list[StatementPlan]] = OrderedDict()
        # The fast path: Describe results of statements whose only work is constant pgml calls
        # (kind "local"), by text and parameter OIDs; see Prepared.describe.
        self.fast_path = bool(cfg["fast_path"])
        self.descriptions: OrderedDict[tuple[str, tuple[int, ...]], StatementDescription] = OrderedDict()
        # Whether a plan may be answered at once (answer_now), by the plan's id; the plan is
        # kept beside its verdict so a reused id is recognised.
        self._now: OrderedDict[int, tuple[StatementPlan, bool]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    def plans(self, sql: str, param_oids: Sequence[int] = ()) -> list[StatementPlan]:
        """The analysed statements of `sql`, from the bounded cache when seen before."""
        return self._cached(sql, param_oids) or self._store(sql, param_oids, self._analyze(sql, param_oids))

    async def plans_off_loop(self, sql: str, param_oids: Sequence[int] = ()) -> list[StatementPlan]:
        """plans(), with a large statement (a long literal) analysed in a worker thread."""
        found = self._cached(sql, param_oids)
        if found is not None or len(sql) < _LARGE_SQL:
            return found or self.plans(sql, param_oids)
        return self._store(sql, param_oids, await asyncio.to_thread(self._analyze, sql, param_oids))

    def _analyze(self, sql: str, param_oids: Sequence[int]) -> list[StatementPlan]:
        return analyze(fold_array_literals(sql), param_oids, self.ctas_embedding)

    def _cached(self, sql: str, param_oids: Sequence[int]) -> list[StatementPlan] | None:
        key = (sql, tuple(param_oids))
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
        return found

    def _store(self, sql: str, param_oids: Sequence[int], plans: list[StatementPlan]) -> list[StatementPlan]:
        self.cache_misses += 1
        key = (sql, tuple(param_oids))
        if self.cache_size:
            self._cache[key] = plans
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return plans

    def passes_through(self, sql: str) -> bool:
        """Whether a whole Query calls nothing of pgml's (it may name the schema): the proxy
        then relays it untouched, so COPY pgml.t FROM STDIN and the like work as direct."""
        try:
            return all(p.kind == "passthrough" for p in self.plans(sql))
        except PgError:
            return False  # the local path reports it

    async def simple_query(
        self, sql: str, upstream: UpstreamSession, sink: ResultSink, ctx: CallContext
    ) -> None:
        plans = await self.plans_off_loop(sql)
        if all(p.kind == "passthrough" for p in plans):
            for res in await upstream.simple(sql):
                await forward_result(res, sink)
            return
        unbound = next((p.n_params for p in plans if p.kind != "passthrough" and p.n_params), 0)
        if unbound:  # a simple Query has no parameters: `$1` there is 42P02, as Postgres says
            raise UndefinedParameter(f"there is no parameter ${unbound}")
        # Postgres runs a multi-statement Query as one implicit transaction: do the same.
        wrap = (
            len(plans) > 1
            and upstream.transaction_status == "I"
            and not any(p.command == "TransactionStmt" for p in plans)
        )
        if wrap:
            await upstream.simple("BEGIN")
        ok = False
        try:
            for plan in plans:
                if plan.kind == "passthrough":
                    for res in await upstream.simple(plan.text):
                        await forward_result(res, sink)
                    continue
                async for event in self.executor.run(plan, upstream, ctx, Bound()):
                    await send_event(event, sink)
            ok = True
        finally:
            if wrap:
                with contextlib.suppress(PgError):
                    await asyncio.shield(upstream.simple("COMMIT" if ok else "ROLLBACK"))

    def now_statement(self, sql: str) -> _NowStatement | None:
        """The fast path of a simple Query analysed before whose only work is pgml calls on
        literals (`StatementHandler.now_statement`). A plan depends on its text alone, so the
        statement stays good for as long as anyone keeps it. Its errors are `simple_query`'s
        to report, with what a failure does to a transaction block."""
        if not self.fast_path:
            return None
        plans = self._cached(sql, ())
        if plans is None or len(plans) != 1 or not self._answerable(plans[0]):
            return None
        return _NowStatement(self, plans[0], now_columns(plans[0], TEXT))

    def answer_many(self, items: Sequence[NowStatement | Portal]) -> list[list[WireValue] | None]:
        """`StatementHandler.answer_many`: the rows of statements and portals this handler made,
        their calls batched across them (planner/execute.py `answer_now_many`)."""
        out: list[list[WireValue] | None] = [None] * len(items)
        if not self.fast_path:
            return out
        work: list[tuple[StatementPlan, Bound]] = []
        where: list[int] = []
        for i, item in enumerate(items):
            found = (
                (item.plan, TEXT) if isinstance(item, _NowStatement)
                else item.now_work() if isinstance(item, PlannerPortal)
                else None
            )
            if found is not None:
                work.append(found)
                where.append(i)
        for i, row in zip(where, answer_now_many(self.executor.runtime, work), strict=True):
            item = items[i]
            if row is not None and isinstance(item, PlannerPortal):
                item.ran_now()
            out[i] = row
        return out

    def _answerable(self, plan: StatementPlan) -> bool:
        found = self._now.get(id(plan))
        if found is None or found[0] is not plan:  # an id reused after an eviction
            found = (plan, answerable_now(plan))
            self._now[id(plan)] = found
            while len(self._now) > max(self.cache_size, 1):
                self._now.popitem(last=False)
        return found[1]

    async def parse(self, sql: str, param_oids: Sequence[int]) -> Prepared:
        plans = await self.plans_off_loop(sql, param_oids)
        if len(plans) > 1:
            raise SyntaxError_("cannot insert multiple commands into a prepared statement")
        if not plans:
            raise SyntaxError_("empty statement")
        return Prepared(self, sql, list(param_oids), plans[0])


class _NowStatement:
    """A simple Query's plan that the fast path answers (core.interfaces.NowStatement)."""

    __slots__ = ("columns", "handler", "plan")

    def __init__(self, handler: Handler, plan: StatementPlan, columns: list[Column]) -> None:
        self.handler, self.plan, self.columns = handler, plan, columns

    def answer(self) -> list[WireValue] | None:
        if not self.handler.fast_path:
            return None
        try:
            return answer_now(self.handler.executor.runtime, self.plan, TEXT)
        except PgError:
            return None


async def forward_result(res: QueryResult, sink: ResultSink) -> None:
    for notice in res.notices:
        await sink.notice(notice)
    if res.columns is not None:
        await sink.row_description(res.columns)
        if res.rows:
            await sink.data_rows(res.rows)
    await sink.command_complete(res.command_tag)


async def send_event(event: Event, sink: ResultSink) -> None:
    kind, value = event
    if kind == "columns":
        await sink.row_description(value)
    elif kind == "rows":
        await sink.data_rows(value)
    elif kind == "copy":
        await sink.copy_message(value)
    else:
        await sink.command_complete(value)


class Prepared:
    """Implements `PreparedStatement` for a statement that mentions pgml."""

    def __init__(self, handler: Handler, sql: str, param_oids: list[int], plan: StatementPlan) -> None:
        self.handler, self.sql, self.plan = handler, sql, plan
        n = max(plan.n_params, len(param_oids))
        oids = param_oids + [0] * (n - len(param_oids))
        from planner.catalog import TYPE_OIDS

        for num, sql_type in plan.param_types.items():
            if not oids[num - 1] and sql_type in TYPE_OIDS:
                oids[num - 1] = TYPE_OIDS[sql_type]
        self.declared = list(param_oids)
        self.oids = oids
        self._desc: StatementDescription | None = None

    async def describe(self, upstream: UpstreamSession) -> StatementDescription:
        if self._desc is None:
            self._desc = self.handler.descriptions.get(self._key()) if self._fast() else None
        if self._desc is None:
            sql = self.sql if self.plan.kind == "passthrough" else (self.plan.describe_sql or self.plan.sql)
            if self.plan.kind == "explain":
                self._desc = StatementDescription(self.oids, [Column("QUERY PLAN", 25)])
            else:
                desc = await upstream.describe(sql, self.oids)
                # As many parameters as the statement has: a passthrough plan does not count its
                # `$n` (lib/pq's Parse declares none and reads the count from this answer).
                n = max(len(self.oids), len(desc.param_oids))
                oids = list(desc.param_oids) + self.oids[len(desc.param_oids) :]
                self._desc = StatementDescription(oids[:n], desc.columns)
            self._remember(self._desc)
        self.oids = [
            o or d for o, d in itertools.zip_longest(self.oids, self._desc.param_oids, fillvalue=0)
        ]
        return self._desc

    def _fast(self) -> bool:
        return self.handler.fast_path and self.plan.kind == "local"

    def _key(self) -> tuple[str, tuple[int, ...]]:
        return (self.sql, tuple(self.declared))

    def _remember(self, desc: StatementDescription) -> None:
        """Keep a local statement's description when every type in it is built in: a built-in
        type's OID is the same in every database, so the answer holds for every client. The
        describe SQL names its types by cast (`CAST(NULL AS real)`), so only a search_path that
        puts a schema with a type of the same name before pg_catalog could make it differ."""
        oids = [*desc.param_oids, *(c.type_oid for c in desc.columns or [])]
        if not self._fast() or any(o >= _FIRST_USER_OID or o == 0 for o in oids):
            return
        cache = self.handler.descriptions
        cache[self._key()] = desc
        while len(cache) > max(self.handler.cache_size, 1):
            cache.popitem(last=False)

    async def bind(
        self, params: Sequence[WireValue], param_formats: Sequence[int], result_formats: Sequence[int]
    ) -> PlannerPortal:
        check_bind(params, param_formats, result_formats, self.oids)
        return PlannerPortal(self, Bound(params, param_formats, self.oids, result_formats))

    def bind_now(
        self, params: Sequence[WireValue], param_formats: Sequence[int], result_formats: Sequence[int]
    ) -> PlannerPortal | None:
        """`bind` on the fast path: it never waits (the parameters are checked here and read at
        Execute), so the proxy need not start a task for it."""
        if not self.handler.fast_path:
            return None
        check_bind(params, param_formats, result_formats, self.oids)
        return PlannerPortal(self, Bound(params, param_formats, self.oids, result_formats))

    def answerable(self) -> bool:
        """Whether a portal of this statement may be answered at once (`PlannerPortal.execute_now`):
        the fast path is on, the plan qualifies, and the parameter types are known without asking
        the upstream."""
        return (
            self.handler.fast_path
            and self.handler._answerable(self.plan)
            and (self._desc is not None or 0 not in self.oids)
        )


class PlannerPortal:
    """Implements `Portal`: runs the plan on first Execute, keeps the rest for later ones."""

    def __init__(self, prepared: Prepared, bound: Bound) -> None:
        self.prepared = prepared
        self.bound = bound
        self._events: AsyncIterator[Event] | None = None
        self._buffer: list[list[WireValue]] = []
        self._tag: str | None = None
        self._cursor: str | None = None  # the upstream cursor behind a row-limited portal
        self._cursor_done = False
        self._completed: str | None = None  # the tag, once an unlimited Execute ran it to the end
        self.name = ""

    async def describe(self, upstream: UpstreamSession) -> list[Column] | None:
        desc = await self.prepared.describe(upstream)
        if desc.columns is None:
            return None
        return [dataclasses.replace(c, format=self.bound.result_fmt(i)) for i, c in enumerate(desc.columns)]

    def describe_now(self) -> list[Column] | None:
        """`describe` when the statement's description is already known; None otherwise."""
        desc = self.prepared._desc
        if not self.prepared.handler.fast_path or desc is None or desc.columns is None:
            return None
        return [dataclasses.replace(c, format=self.bound.result_fmt(i)) for i, c in enumerate(desc.columns)]

    def execute_now(self) -> tuple[list[WireValue], str] | None:
        """The fast path of Execute: the one row and the tag of a portal whose statement is
        `answerable`, when the runtime answers at once and the portal has not started; None
        when `execute` must run it (errors included: that path reports them)."""
        work = self.now_work()
        if work is None:
            return None
        try:
            row = answer_now(self.prepared.handler.executor.runtime, *work)
        except PgError:
            return None
        if row is None:
            return None
        self.ran_now()
        return row, "SELECT 1"

    def may_execute_now(self) -> bool:
        return self.now_work() is not None

    def again(self) -> PlannerPortal:
        portal = PlannerPortal(self.prepared, self.bound)
        portal.name = self.name
        return portal

    def now_work(self) -> tuple[StatementPlan, Bound] | None:
        """What `execute_now` would answer (the plan and its bound parameters), or None when the
        portal is not for the fast path: started already, or its statement not `answerable`."""
        prepared = self.prepared
        if self._events is not None or self._cursor is not None or not prepared.answerable():
            return None
        if 0 in self.bound.oids:  # the types the statement's Describe learnt (answerable says known)
            self.bound = dataclasses.replace(self.bound, oids=prepared.oids)
        return prepared.plan, self.bound

    def ran_now(self) -> None:
        """The fast path answered this portal: a later Execute finds it completed, as after `execute`."""
        self._events = _done()
        self._completed = "SELECT 1"

    def _start(self, upstream: UpstreamSession, ctx: CallContext) -> AsyncIterator[Event]:
        plan = self.prepared.plan
        if plan.kind == "passthrough":
            return _passthrough(
                self.prepared.sql, upstream, self.bound, self.prepared.handler.executor.chunk_rows
            )
        return self.prepared.handler.executor.run(plan, upstream, ctx, self.bound)

    async def execute(
        self, upstream: UpstreamSession, sink: ResultSink, ctx: CallContext, max_rows: int = 0
    ) -> bool:
        if self._cursor is not None or (max_rows and self._events is None and self._by_cursor(upstream)):
            return await self._execute_by_cursor(upstream, sink, ctx, max_rows)
        if self._completed is not None:
            await self._execute_completed(upstream, sink)
            return False
        if self._events is None:
            if 0 in self.bound.oids and self.prepared.plan.kind != "passthrough":
                await self.prepared.describe(upstream)  # learn the OIDs the client left to the server
                self.bound = dataclasses.replace(self.bound, oids=self.prepared.oids)
            self._events = self._start(upstream, ctx)
            # COPY ignores the row limit, as Postgres does for a COPY portal.
            if not max_rows or self.prepared.plan.copy_out:
                # The common case: rows go to the client as they are merged.
                tag = ""
                async for kind, value in self._events:
                    if kind == "rows":
                        await sink.data_rows(value)
                    elif kind == "copy":
                        await sink.copy_message(value)
                    elif kind == "tag":
                        tag = value
                await sink.command_complete(tag)
                self._completed = tag
                return False
            # With a row limit the first Execute runs the statement to the end and later ones are
            # served from the buffer: an upstream portal left open across the client's Executes
            # cannot share the server connection with what the proxy sends in between.
            await self._pull(None)
        while self._tag is None and (not max_rows or len(self._buffer) < max_rows):
            await self._pull(max_rows)
        if (max_rows and len(self._buffer) > max_rows) or (
            max_rows and len(self._buffer) == max_rows and self._tag is None
        ):
            rows, self._buffer = self._buffer[:max_rows], self._buffer[max_rows:]
            await sink.data_rows(rows)
            return True
        sent = len(self._buffer)
        if self._buffer:
            await sink.data_rows(self._buffer)
            self._buffer = []
        tag = self._tag or ""
        if max_rows and tag.startswith("SELECT "):
            tag = f"SELECT {sent}"  # as Postgres: the rows of this Execute, not of the whole portal
        await sink.command_complete(tag)
        return False

    async def _execute_completed(self, upstream: UpstreamSession, sink: ResultSink) -> None:
        """An Execute of a portal already run to the end, as Postgres answers it: a statement
        that returns rows gives none and its tag with a count of 0 (`SELECT 0`, `INSERT 0 0`);
        any other cannot run again (55000)."""
        desc = await self.prepared.describe(upstream)
        if desc.columns is None:
            raise ObjectNotInPrerequisiteState(f'portal "{self.name}" cannot be run')
        words = (self._completed or "SELECT").split()
        await sink.command_complete("INSERT 0 0" if words[0] == "INSERT" else f"{words[0]} 0")

    def _by_cursor(self, upstream: UpstreamSession) -> bool:
        """A row-limited SELECT whose pgml calls read rows, inside a transaction block (JDBC's
        fetchSize, asyncpg's cursors): served from an upstream cursor, so the rows not yet
        fetched stay in Postgres instead of the proxy's memory. Outside a block the portal
        ends at Sync anyway, and calls on constants leave nothing to compute per row: buffered."""
        plan = self.prepared.plan
        return (
            plan.kind == "upstream"
            and plan.command == "SelectStmt"
            and bool(plan.steps or plan.stream)
            and upstream.transaction_status == "T"
        )

    async def _execute_by_cursor(
        self, upstream: UpstreamSession, sink: ResultSink, ctx: CallContext, max_rows: int
    ) -> bool:
        if self._cursor is None:
            name = f"pgml_portal_{next(_PORTALS)}"
            handler = self.prepared.handler
            # Not through the parse cache: every portal's DECLARE names its own cursor.
            declare = analyze(
                f"DECLARE {name} NO SCROLL CURSOR FOR {self.prepared.plan.text}",
                self.prepared.oids,
                handler.ctas_embedding,
            )[0]
            bound = dataclasses.replace(self.bound, oids=self.prepared.oids)
            async for _ in handler.executor.run(declare, upstream, ctx, bound):
                pass
            self._cursor = name
        if self._cursor_done:  # Execute on a completed portal: nothing more, as in Postgres
            await sink.command_complete("SELECT 0")
            return False
        # A portal's 0 means every remaining row; FETCH 0 would mean none.
        count = str(max_rows) if max_rows else "ALL"
        # The client's result formats mean for FETCH what they meant for its own statement.
        res = await upstream.execute(
            f"FETCH FORWARD {count} FROM {self._cursor}", result_formats=list(self.bound.result_formats)
        )
        if res.rows:
            await sink.data_rows(res.rows)
        if max_rows and len(res.rows) == max_rows:
            return True  # Postgres suspends at the limit even when nothing is left
        self._cursor_done = True
        await upstream.simple(f"CLOSE {self._cursor}")
        await sink.command_complete(f"SELECT {len(res.rows)}")
        return False

    @property
    def holds_upstream(self) -> bool:
        return self._cursor is not None and not self._cursor_done

    async def close(self, upstream: UpstreamSession) -> None:
        """The client closed or replaced this portal: close its upstream cursor, if still open."""
        name, done = self._cursor, self._cursor_done
        self._cursor_done = True
        if name is None or done or upstream.transaction_status != "T":
            return  # never opened, already closed, or gone with its transaction
        if await cursor_open(upstream, name):
            await upstream.simple(f"CLOSE {name}")

    async def _pull(self, max_rows: int | None) -> None:
        assert self._events is not None
        async for kind, value in self._events:
            if kind == "rows":
                self._buffer.extend(value)
                if max_rows and len(self._buffer) >= max_rows:
                    return
            elif kind == "tag":
                self._tag = value
        if self._tag is None:
            self._tag = ""


async def _passthrough(
    sql: str, upstream: UpstreamSession, bound: Bound, chunk_rows: int
) -> AsyncIterator[Event]:
    async for chunk in upstream.stream(
        sql,
        bound.params,
        param_oids=bound.oids,
        param_formats=bound.formats,
        result_formats=bound.result_formats,
        chunk_rows=chunk_rows,
    ):
        if chunk.rows:
            yield "rows", chunk.rows
        if chunk.command_tag:
            yield "tag", chunk.command_tag


async def _done() -> AsyncIterator[Event]:
    """The events of a portal the fast path answered: none left."""
    return
    yield  # an async generator
