"""The executor: carries out a `StatementPlan` against an UpstreamSession and the Runtime.

Owns argument evaluation (literals, client parameters, the one-off evaluation query),
runtime batching per chunk, filling the temp tables of materialised calls, merging
streamed rows with model results, transaction wrapping (a statement that needs temp
tables runs in one transaction, so a failure writes nothing) and EXPLAIN output.
Yields events: ("columns", [Column]), ("rows", [[bytes|None]]), ("copy", bytes: a CopyOut
message to relay), ("tag", str).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from core import functions
from core.errors import DuplicateCursor, InFailedSqlTransaction, NoActiveSqlTransaction, PgError
from core.interfaces import CallContext, Column, ColumnCalls, Runtime, UpstreamSession, WireValue
from core.stop import Stop, timeout_ms
from planner.args import coerce
from planner.catalog import ANY, TYPE_OIDS
from planner.plan import (
    CallPlan,
    ClientParam,
    ConstCall,
    Evaluated,
    Literal,
    RowColumn,
    StatementPlan,
    TempStep,
)
from planner.values import TYPE_SIZES, copy_text_row, decoder, encoder, type_oid

Event = tuple[str, Any]
T = TypeVar("T")
_ARG_COL = re.compile(r"^__pgml_(\d+)_(\d+)$")


# Functions whose identical calls in one statement may share one evaluation.
_DETERMINISTIC = frozenset(fn.name for fn in functions.FUNCTIONS if fn.deterministic)


@dataclass
class Bound:
    """A statement's client parameters as bound (raw bytes, formats, OIDs)."""

    params: Sequence[WireValue] = ()
    formats: Sequence[int] = ()
    oids: Sequence[int] = ()
    result_formats: Sequence[int] = ()

    def fmt(self, i: int) -> int:
        return (
            self.formats[0] if len(self.formats) == 1 else (self.formats[i] if i < len(self.formats) else 0)
        )

    def result_fmt(self, i: int) -> int:
        rf = self.result_formats
        return rf[0] if len(rf) == 1 else (rf[i] if i < len(rf) else 0)


TEXT = Bound()  # a simple Query's: no parameters, every result in text


async def arm_timeout(up: UpstreamSession, ctx: CallContext) -> None:
    """Start the statement's statement_timeout clock; read the client's setting when unknown.

    Read on the client's own server connection, so SET, SET LOCAL, set_config, startup
    options and role defaults all count, as they would in Postgres. The proxy caches the
    value and asks again only after the client's statements may have changed it.
    """
    ms = ctx.statement_timeout
    if ms is None:
        if up.transaction_status == "E":
            return  # the statement fails with 25P02 before any model work
        res = await up.execute("SELECT current_setting('statement_timeout')")
        ms = timeout_ms((res.rows[0][0] or b"0").decode())
        ctx.statement_timeout = ms
        if ctx.timeout_read is not None:
            ctx.timeout_read(ms)
    ctx.stop.set_timeout(ms)


async def stoppable(ctx: CallContext, work: Awaitable[T]) -> T:
    """Await runtime work that ends with the statement's 57014 as soon as its scope is stopped.

    Only the task that awaits the runtime is cancelled: an exchange with the upstream in
    another task of the statement is never cut in the middle.
    """
    stop = ctx.stop
    stop.check()
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def on_stop() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    stop.add(on_stop)
    try:
        return await work
    except asyncio.CancelledError:
        if not fired:
            raise
        task.uncancel()
        raise stop.error() from None
    finally:
        stop.discard(on_stop)


async def cursor_open(up: UpstreamSession, name: str) -> bool:
    """Whether the upstream session has an open cursor of this name."""
    res = await up.execute("SELECT 1 FROM pg_cursors WHERE name = $1", [name.encode()], param_oids=[25])
    return bool(res.rows)


class Executor:
    def __init__(
        self, runtime: Runtime, chunk_rows: int, materialise_rows: int, chunk_bytes: int = 0
    ) -> None:
        self.runtime = runtime
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.materialise_rows = materialise_rows
        self.vector_oid = 0

    async def run(
        self, plan: StatementPlan, upstream: UpstreamSession, ctx: CallContext, bound: Bound
    ) -> AsyncIterator[Event]:
        run = _Run(self, plan, upstream, ctx, bound)
        async for event in run.events():
            yield event

    async def vector(self, upstream: UpstreamSession) -> int:
        if not self.vector_oid:
            res = await upstream.execute("SELECT 'vector'::regtype::oid")
            self.vector_oid = int(res.rows[0][0] or b"0")
        return self.vector_oid


def _task_json(name: str, value: Any) -> Any:
    """A `task` given as JSON text is the JSON object (`task => '{"task": ...}'` is text)."""
    if name == "task" and isinstance(value, str) and value.lstrip().startswith("{"):
        return coerce(value, "jsonb")
    return value


_LARGE_PARAM = 1 << 16  # bytes: a client parameter at least this large is decoded in a thread
_MISSING = object()


def decode_param(bound: Bound, params: Sequence[WireValue], formats: Sequence[int], src: ClientParam) -> Any:
    """A client parameter as the Python value of the pgml argument's SQL type."""
    i = src.number - 1
    given = bound.oids[i] if i < len(bound.oids) else 0
    oid = given or TYPE_OIDS.get(src.sql_type, 25)
    value = decoder(oid, formats[i])(params[i])
    return value if given == TYPE_OIDS.get(src.sql_type) else coerce(value, src.sql_type)


def answerable_now(plan: StatementPlan) -> bool:
    """Whether `answer_now` may answer this plan: a local SELECT of scalar pgml calls whose
    arguments are literals or client parameters (no evaluation query, no nested calls)."""
    return (
        plan.kind == "local"
        and bool(plan.local)
        and plan.eval_sql is None
        and not plan.consts
        and all(
            not tg.call.sig.setof
            and tg.out_type != "vector"  # its OID is the database's: read upstream
            and all(isinstance(src, Literal | ClientParam) for src in tg.call.sources.values())
            for tg in plan.local or []
        )
    )


def answer_now(runtime: Runtime, plan: StatementPlan, bound: Bound) -> list[WireValue] | None:
    """The one row of an `answerable_now` plan when `Runtime.call_now` answers every call at once
    (the fast path: no task, no await, no upstream); None when the planned path must run it.
    The values, NULLs and encodings are those `_Run._local` gives; errors are raised as there."""
    params = list(bound.params) + [None] * (plan.n_params - len(bound.params))
    if any(p is not None and len(p) >= _LARGE_PARAM for p in params):
        return None  # decoded in a thread on the planned path
    formats = [bound.fmt(i) for i in range(len(params))]
    row: list[WireValue] = []
    for i, tg in enumerate(plan.local or []):
        args = _now_args(tg.call, bound, params, formats)
        if args is None:  # a NULL argument of a STRICT call: NULL, with no model work
            row.append(None)
            continue
        out = runtime.call_now(tg.call.sig.name, [args])
        if out is None:
            return None
        row.append(encoder(tg.out_type, bound.result_fmt(i))(out[0]))
    return row


def _now_args(
    call: CallPlan, bound: Bound, params: Sequence[WireValue], formats: Sequence[int]
) -> dict[str, Any] | None:
    args: dict[str, Any] = {}
    for name, src in call.sources.items():
        if isinstance(src, Literal):
            value = _task_json(name, src.value)
        else:
            assert isinstance(src, ClientParam)
            value = _task_json(name, decode_param(bound, params, formats, src))
        if value is None and call.sig.strict:
            return None
        args[name] = value
    args.update(call.defaults)
    return args


def _group(call: CallPlan, args: dict[str, Any]) -> tuple[Any, ...]:
    """The calls that go to the runtime together: one function, the same scalar arguments."""
    scalars = tuple((k, v) for k, v in args.items() if v is None or isinstance(v, str | int | float))
    return call.sig.name, scalars


# Plans with no client parameters: each local target's group and arguments, by the plan's id
# (the entry keeps the plan alive, so its id is not reused while it is here).
_CONSTANT: dict[int, tuple[StatementPlan, list[tuple[tuple[Any, ...], dict[str, Any]] | None]]] = {}
_CONSTANT_MAX = 1024


def _constant_calls(plan: StatementPlan) -> list[tuple[tuple[Any, ...], dict[str, Any]] | None] | None:
    """`_now_args` and `_group` of each local target of a plan that takes no client
    parameters, worked out once (None for a strict call given a NULL: its column is NULL).
    None when an argument does not convert: each such statement is answered alone, which
    reports it. The runtime only reads the arguments, so every statement shares them."""
    found = _CONSTANT.get(id(plan))
    if found is not None and found[0] is plan:
        return found[1]
    out: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = []
    try:
        for tg in plan.local or []:
            args = _now_args(tg.call, TEXT, (), ())
            out.append(None if args is None else (_group(tg.call, args), args))
    except PgError:
        return None
    if len(_CONSTANT) >= _CONSTANT_MAX:
        _CONSTANT.clear()
    _CONSTANT[id(plan)] = (plan, out)
    return out


def answer_now_many(
    runtime: Runtime, work: Sequence[tuple[StatementPlan, Bound]]
) -> list[list[WireValue] | None]:
    """`answer_now` for the statements of many clients at once (simple Queries, or portals of
    prepared statements with their parameters): the calls of one function with the same
    scalar arguments (one project) go to `Runtime.call_now` together, one library call for all
    their rows. A group the runtime refuses or fails is answered one statement at a time, so
    each error stays its own statement's."""
    rows: list[list[WireValue] | None] = [[None] * len(p.local or []) for p, _ in work]
    groups: dict[tuple[Any, ...], list[tuple[int, int, dict[str, Any]]]] = {}
    alone: set[int] = set()
    for pi, (plan, bound) in enumerate(work):
        constant = None if plan.n_params or bound.params else _constant_calls(plan)
        if constant is not None:
            for ti, found in enumerate(constant):
                if found is not None:
                    groups.setdefault(found[0], []).append((pi, ti, found[1]))
            continue
        params = list(bound.params) + [None] * (plan.n_params - len(bound.params))
        if any(p is not None and len(p) >= _LARGE_PARAM for p in params):
            rows[pi] = None  # decoded in a thread on the planned path
            continue
        formats = [bound.fmt(i) for i in range(len(params))]
        try:
            for ti, tg in enumerate(plan.local or []):
                args = _now_args(tg.call, bound, params, formats)
                if args is not None:
                    groups.setdefault(_group(tg.call, args), []).append((pi, ti, args))
        except PgError:
            alone.add(pi)  # a parameter that does not decode: its statement reports it
    for (function, _), items in groups.items():
        out = None
        if len(items) > 1:
            with contextlib.suppress(PgError):
                out = runtime.call_now(function, [a for _, _, a in items])
        if out is None:
            alone.update(pi for pi, _, _ in items)
            continue
        for (pi, ti, _), value in zip(items, out, strict=True):
            row = rows[pi]
            if row is not None:
                plan, bound = work[pi]
                row[ti] = encoder((plan.local or [])[ti].out_type, bound.result_fmt(ti))(value)
    for pi in alone:
        try:
            rows[pi] = answer_now(runtime, *work[pi])
        except PgError:
            rows[pi] = None  # the planned path reports it
    return rows


def now_columns(plan: StatementPlan, bound: Bound) -> list[Column]:
    """The RowDescription of an `answerable_now` plan, as `_Run._local` gives it."""
    out = []
    for i, tg in enumerate(plan.local or []):
        oid = type_oid(tg.out_type, 0)
        out.append(Column(tg.name, oid, type_size=TYPE_SIZES.get(oid, -1), format=bound.result_fmt(i)))
    return out

class _Run:
    """One execution of one plan."""

    def __init__(
        self, ex: Executor, plan: StatementPlan, up: UpstreamSession, ctx: CallContext, bound: Bound
    ) -> None:
        self.ex, self.plan, self.up, self.ctx, self.bound = ex, plan, up, ctx, bound
        self.evaluated: list[Any] = []
        self.params: list[WireValue] = list(bound.params) + [None] * (plan.n_params - len(bound.params))
        self.formats = [bound.fmt(i) for i in range(len(self.params))]
        oids = list(bound.oids) + [0] * (plan.n_params - len(bound.oids))
        for n, sql_type in plan.param_types.items():
            if n <= len(oids) and not oids[n - 1] and sql_type in TYPE_OIDS:
                oids[n - 1] = TYPE_OIDS[sql_type]
        self.oids = oids
        self._decoded: dict[tuple[int, str], Any] = {}  # large client parameters, decoded off the loop

    # --- arguments ----------------------------------------------------------------------------
    async def _decode_large_params(self) -> None:
        """Decode the client's large parameters (a 10^6-element features array is 0.3 s of
        parsing) in a thread, so the event loop keeps serving everyone else meanwhile."""
        loop = asyncio.get_running_loop()
        for call in self.plan.calls:
            for src in call.sources.values():
                if not isinstance(src, ClientParam) or src.number > len(self.params):
                    continue
                data, key = self.params[src.number - 1], (src.number - 1, src.sql_type)
                if data is not None and len(data) >= _LARGE_PARAM and key not in self._decoded:
                    self._decoded[key] = await loop.run_in_executor(None, self._decode, src)

    def _client_param(self, src: ClientParam) -> Any:
        cached = self._decoded.get((src.number - 1, src.sql_type), _MISSING)
        return self._decode(src) if cached is _MISSING else cached

    def _decode(self, src: ClientParam) -> Any:
        return decode_param(self.bound, self.params, self.formats, src)

    def constant(self, src: Literal | ClientParam | Evaluated) -> Any:
        if isinstance(src, Literal):
            return src.value
        if isinstance(src, ClientParam):
            return self._client_param(src)
        return self.evaluated[src.index]

    def call_args(self, call: CallPlan, row: Sequence[Any] | None = None) -> dict[str, Any] | None:
        """The runtime's mapping for one call, or None when a NULL argument makes a STRICT call NULL."""
        return self._rows_args(call, [row])[0]

    def _rows_args(self, call: CallPlan, rows: Sequence[Sequence[Any] | None]) -> list[dict[str, Any] | None]:
        """call_args for each row; the row-independent arguments are read once (a chunk of a
        100,000-row predict is thousands of rows with one project name)."""
        strict = call.sig.strict
        fixed: dict[str, Any] = {}
        from_row: list[tuple[str, int]] = []
        for name, src in call.sources.items():
            if isinstance(src, RowColumn):
                from_row.append((name, src.index))
                continue
            value = _task_json(name, self.constant(src))
            if value is None and strict:  # a NULL constant of a STRICT call: every result is NULL
                return [None] * len(rows)
            fixed[name] = value
        fixed.update(call.defaults)
        out: list[dict[str, Any] | None] = []
        for row in rows:
            values = dict(fixed)
            for name, index in from_row:
                value = _task_json(name, None if row is None else row[index])
                if value is None and strict:
                    out.append(None)
                    break
                values[name] = value
            else:
                out.append(values)
        return out

    async def batch(self, call: CallPlan, rows: Sequence[Sequence[Any] | None]) -> list[Any]:
        """Run `call` once per row (STRICT NULLs skipped), results in row order."""
        args = self._rows_args(call, rows)
        todo = [a for a in args if a is not None]
        if call.sig.name == "transform_stream":  # the runtime streams it: collect each call's rows
            out = [await stoppable(self.ctx, self._collect(call.sig.name, a)) for a in todo]
            results = iter(out)
        else:
            results = iter(
                await stoppable(self.ctx, self.ex.runtime.call_batch(call.sig.name, todo, self.ctx))
                if todo
                else []
            )
        return [None if a is None else next(results) for a in args]

    async def batch_columns(self, call: CallPlan, columns: Sequence[Sequence[Any]], rows: int) -> list[Any]:
        """`batch` for a chunk read column-wise: `columns` in the order of the call's RowColumn
        indexes. When every row-dependent argument is a NumPy matrix (no NULL anywhere, so no
        STRICT call to skip) the runtime gets them whole as `ColumnCalls`; else row by row."""
        if call.sig.name == "transform_stream" or not all(isinstance(c, np.ndarray) for c in columns):
            return await self.batch(call, list(zip(*columns, strict=True)))
        fixed: dict[str, Any] = {}
        by_name: dict[str, Any] = {}
        for name, src in call.sources.items():
            if isinstance(src, RowColumn):
                by_name[name] = columns[src.index]
                continue
            value = _task_json(name, self.constant(src))
            if value is None and call.sig.strict:
                return [None] * rows
            fixed[name] = value
        fixed.update(call.defaults)
        calls = ColumnCalls(fixed, by_name, rows)
        return await stoppable(self.ctx, self.ex.runtime.call_batch(call.sig.name, calls, self.ctx))

    async def _collect(self, function: str, args: dict[str, Any]) -> list[tuple[Any]]:
        return [(piece,) async for piece in self.ex.runtime.stream(function, args, self.ctx)]

    async def _evaluate_constants(self) -> None:
        plan = self.plan
        if plan.eval_sql:
            res = await self.up.execute(
                plan.eval_sql, self.params, param_oids=self.oids, param_formats=self.formats
            )
            cols = res.columns or []
            self.evaluated = [decoder(c.type_oid, 0)(v) for c, v in zip(cols, res.rows[0], strict=True)]
        if not plan.consts:  # the one-row path's common case: nothing more to evaluate
            return
        # EXPLAIN evaluates constant calls too (one model call each): with NULL in their place
        # Postgres would fold `embedding <=> NULL` away and show a plan the statement never gets.
        # Identical calls of a deterministic function (`ORDER BY e <=> pgml.embed('m', 'q')` beside
        # `1 - (e <=> pgml.embed('m', 'q'))`) run once; distinct ones are submitted together, so the
        # runtime may batch them. transform may sample: each of its calls runs, as in Postgres.
        keys = [
            json.dumps([c.call.sig.name, self.call_args(c.call)], sort_keys=True, default=repr)
            if c.call.sig.name in _DETERMINISTIC
            else str(i)
            for i, c in enumerate(plan.consts)
        ]
        first: dict[str, ConstCall] = {}
        for key, const in zip(keys, plan.consts, strict=True):
            first.setdefault(key, const)
        results = await asyncio.gather(*(self.batch(c.call, [None]) for c in first.values()))
        value_of = {key: r[0] for key, r in zip(first, results, strict=True)}
        for key, const in first.items():
            if const.call.sig.setof and value_of[key] is not None:  # its rows, as one array
                value_of[key] = [row[0] if isinstance(row, tuple) else row for row in value_of[key]]
        for key, const in zip(keys, plan.consts, strict=True):
            enc = encoder(const.out_type, 0)
            self.params.append(enc(value_of[key]))
            self.formats.append(0)
            self.oids.append(TYPE_OIDS[const.out_type])

    # --- the statement ------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[Event]:
        plan = self.plan
        await arm_timeout(self.up, self.ctx)
        await self._decode_large_params()
        status = self.up.transaction_status
        if status == "E":  # as Postgres: nothing runs in a failed block, a local call neither
            raise InFailedSqlTransaction(
                "current transaction is aborted, commands ignored until end of transaction block"
            )
        if plan.kind in ("local", "local_table"):
            async for event in self._local():
                yield event
            return
        opened = False
        ok = False
        if plan.cursor is not None:
            await self._cursor_checks(status)
        if plan.needs_temp and status == "I":
            await self.up.simple("BEGIN")
            opened = True
        try:
            await self._evaluate_constants()
            for step in plan.steps:
                await self._materialise(step)
            if plan.kind == "explain":
                async for event in self._explain():
                    yield event
            elif plan.copy_out:
                async for item in self.up.copy_out(
                    plan.sql, self.params, param_oids=self.oids, param_formats=self.formats
                ):
                    yield ("copy", item) if isinstance(item, bytes) else ("tag", item)
            elif plan.stream:
                async for event in self._stream():
                    yield event
            else:
                async for event in self._forward():
                    yield event
                await self._dimension_vectors()
            ok = True
        finally:
            await asyncio.shield(self._finish(opened, ok))

    async def _dimension_vectors(self) -> None:
        """Type CREATE TABLE AS embedding columns `vector(N)`, N read from the rows just written.

        Runs in the statement's transaction, so the table never exists without its dimensions.
        Left as plain `vector` when the column is empty or its vectors differ in length.
        """
        for table, column in self.plan.vector_columns:
            # `table` and `column` are identifiers deparsed by pglast (quoted), never raw client text.
            res = await self.up.execute(
                f"SELECT min(vector_dims({column})), max(vector_dims({column})) FROM {table}"
            )
            low, high = res.rows[0]
            if low is not None and low == high:
                await self.up.simple(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE vector({int(low)})")

    def _temp_tables(self) -> str:
        return ", ".join(f"pg_temp.{n}" for s in self.plan.steps for n in (s.keys, s.results) if n)

    async def _cursor_checks(self, status: str) -> None:
        """What Postgres checks of a DECLARE, before any model work; then clear the tables a
        closed cursor of this same statement left (they are dropped at commit otherwise)."""
        name = self.plan.cursor or ""
        if not self.plan.cursor_hold and status == "I":
            raise NoActiveSqlTransaction("DECLARE CURSOR can only be used in transaction blocks")
        if await cursor_open(self.up, name):
            raise DuplicateCursor(f'cursor "{name}" already exists')
        if status != "I" and self.plan.needs_temp:
            await self.up.simple("DROP TABLE IF EXISTS " + self._temp_tables())

    async def _finish(self, opened: bool, ok: bool) -> None:
        with contextlib.suppress(PgError):
            # A cursor reads its tables at every FETCH: they go at commit (ON COMMIT DROP).
            if self.plan.needs_temp and ok and self.plan.cursor is None:
                await self.up.simple("DROP TABLE IF EXISTS " + self._temp_tables())
            if opened:
                await self.up.simple("COMMIT" if ok else "ROLLBACK")
            # A failure inside the client's own transaction block: the proxy (localexec) aborts the
            # block for every failed pgml statement, local answers included.

    async def _materialise(self, step: TempStep) -> None:
        up, plan = self.up, self.plan
        no_data = plan.kind == "explain" and not plan.explain_analyze
        if step.create_keys:
            if any(n <= len(self.oids) and not self.oids[n - 1] for n in step.keys_params):
                await self._infer_param_types(step)
            sql = step.create_keys + (" WITH NO DATA" if no_data else "")
            await up.execute(sql, self.params, param_oids=self.oids, param_formats=self.formats)
            for ddl in step.index_sql:
                await up.simple(ddl)
        await up.simple(step.create_results)
        if not no_data:
            await self._fill(step)
        for ddl in step.post_sql:
            await up.simple(ddl)

    async def _infer_param_types(self, step: TempStep) -> None:
        """The types Postgres gives the $n the client sent untyped, read from a Describe of the
        keys' SELECT (a SELECT infers them; the CREATE TABLE AS around it would not)."""
        used = set(step.keys_params)
        # A $n the SELECT does not read must still have a type for Parse: text, never used.
        asked = [o if (i + 1) in used else (o or 25) for i, o in enumerate(self.oids)]
        desc = await self.up.describe(step.keys_select, asked)
        for i, oid in enumerate(desc.param_oids[: len(self.oids)]):
            if not self.oids[i] and (i + 1) in used:
                self.oids[i] = oid

    async def _fill(self, step: TempStep) -> None:
        call = step.call
        types = [call.sig.returns] if not step.srf else [typ for _, typ in call.sig.out_columns()]
        encs = [encoder("bigint", 0)] + ([encoder("bigint", 0)] if step.srf else [])
        encs += [encoder(typ, 0) for typ in types]
        copy_sql = f"COPY pg_temp.{step.results} FROM STDIN"
        if step.fetch_keys is None:
            result = (await self.batch(call, [None]))[0]
            await self.up.copy_in(copy_sql, self._copy_rows(step, [None], [result], encs))
            return
        lo, size = 0, self.ex.materialise_rows
        pending: asyncio.Task[bytes] | None = None
        try:
            while True:
                res = await self.up.execute(
                    step.fetch_keys, [str(lo).encode(), str(lo + size).encode()], param_oids=[20, 20]
                )
                if pending is not None:
                    await self.up.copy_in(copy_sql, await pending)
                    pending = None
                if not res.rows:
                    break
                decs = [decoder(c.type_oid, 0) for c in res.columns or []]
                rows = [[d(v) for d, v in zip(decs, row, strict=True)] for row in res.rows]
                pending = asyncio.ensure_future(self._compute_copy(step, rows, encs))
                lo += size
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    async def _compute_copy(self, step: TempStep, rows: list[list[Any]], encs: list[Any]) -> bytes:
        results = await self.batch(step.call, [row[1:] for row in rows])
        # Encoding thousands of vectors as COPY text takes a while: off the event loop, so a
        # cancel or the statement's timeout (and every other client) is served meanwhile.
        keys = [row[0] for row in rows]
        loop = asyncio.get_running_loop()
        return await stoppable(
            self.ctx, loop.run_in_executor(None, self._copy_rows, step, keys, results, encs, self.ctx.stop)
        )

    @staticmethod
    def _copy_rows(
        step: TempStep, keys: list[Any], results: list[Any], encs: list[Any], stop: Stop | None = None
    ) -> bytes:
        out = bytearray()
        for n, (key, result) in enumerate(zip(keys, results, strict=True)):
            if stop is not None and n % 256 == 0 and stop.stopped:
                # A stopped statement's encoding thread ends here instead of holding the GIL.
                raise stop.error()
            if not step.srf:
                out += copy_text_row([key, result], encs)
                continue
            rows = result if isinstance(result, list) and step.call.sig.setof else [result]
            for ord_, item in enumerate(rows or [], start=1):
                if item is None:
                    continue
                values = list(item) if isinstance(item, tuple) else [item]
                out += copy_text_row([key, ord_, *values], encs)
        return bytes(out)

    # --- results ------------------------------------------------------------------------------
    async def _forward(self) -> AsyncIterator[Event]:
        sent = False
        count = 0
        async for chunk in self.up.stream(
            self.plan.sql,
            self.params,
            param_oids=self.oids,
            param_formats=self.formats,
            result_formats=self.bound.result_formats,
            chunk_rows=self.ex.chunk_rows,
        ):
            if chunk.columns is not None and not sent:
                yield "columns", chunk.columns
                sent = True
            count += len(chunk.rows)
            if chunk.rows:
                yield "rows", chunk.rows
            if chunk.command_tag:
                tag = chunk.command_tag
                yield "tag", f"SELECT {count}" if tag.startswith("SELECT ") else tag

    async def _stream(self) -> AsyncIterator[Event]:
        from planner.merge import Merger

        merger = Merger(self)
        async for event in merger.events():
            yield event

    async def _explain(self) -> AsyncIterator[Event]:
        from planner.explain import proxy_lines

        assert self.plan.explain_sql is not None
        res = await self.up.execute(
            self.plan.explain_sql, self.params, param_oids=self.oids, param_formats=self.formats
        )
        lines = [
            [line.encode()] for line in proxy_lines(self.plan, self.ex.chunk_rows, self.ex.materialise_rows)
        ]
        yield "columns", [Column("QUERY PLAN", 25)]
        yield "rows", lines + [list(r[:1]) for r in res.rows]
        yield "tag", "EXPLAIN"

    async def _local(self) -> AsyncIterator[Event]:
        plan = self.plan
        assert plan.local is not None
        await self._evaluate_constants()
        vec = await self.ex.vector(self.up) if any(t.out_type == "vector" for t in plan.local) else 0
        if plan.kind == "local_table" and plan.local[0].call.sig.name == "transform_stream":
            async for event in self._local_stream(vec):
                yield event
            return
        if plan.kind == "local_table":
            cols = plan.local_columns or []
            result = (await self.batch(plan.local[0].call, [None]))[0]
            rows = result if plan.local[0].call.sig.setof else [result]
            rows = [r if isinstance(r, tuple) else (r,) for r in (rows or []) if r is not None]
            yield "columns", [self.column(n, typ, i, vec) for i, (n, typ) in enumerate(cols)]
            encs = [encoder(typ, self.bound.result_fmt(i), vec) for i, (_, typ) in enumerate(cols)]
            out = [[e(v) for e, v in zip(encs, r, strict=True)] for r in rows]
        else:
            targets = plan.local
            values = [await self.batch(tg.call, [None]) for tg in targets]
            yield "columns", [self.column(tg.name, tg.out_type, i, vec) for i, tg in enumerate(targets)]
            encs = [encoder(tg.out_type, self.bound.result_fmt(i), vec) for i, tg in enumerate(targets)]
            if targets[0].call.sig.setof:
                items = values[0][0] or []
                out = [[encs[0](r[0] if isinstance(r, tuple) and len(r) == 1 else r)] for r in items]
            else:
                out = [[e(v[0]) for e, v in zip(encs, values, strict=True)]]
        if out:
            yield "rows", out
        yield "tag", f"SELECT {len(out)}"

    async def _local_stream(self, vec: int) -> AsyncIterator[Event]:
        """`SELECT * FROM pgml.transform_stream(...)`: each piece goes to the client as it is made."""
        assert self.plan.local is not None and self.plan.local_columns is not None
        (name, typ), call = self.plan.local_columns[0], self.plan.local[0].call
        yield "columns", [self.column(name, typ, 0, vec)]
        args = self.call_args(call)
        count = 0
        if args is not None:
            enc = encoder(typ, self.bound.result_fmt(0), vec)
            pieces = aiter(self.ex.runtime.stream(call.sig.name, args, self.ctx))
            while True:
                try:
                    piece = await stoppable(self.ctx, anext(pieces))
                except StopAsyncIteration:
                    break
                count += 1
                yield "rows", [[enc(piece)]]
        yield "tag", f"SELECT {count}"

    def column(self, name: str, sql_type: str, i: int, vector_oid: int) -> Column:
        oid = type_oid(sql_type, vector_oid)
        return Column(name, oid, type_size=TYPE_SIZES.get(oid, -1), format=self.bound.result_fmt(i))


def arg_column(name: str) -> tuple[int, int] | None:
    m = _ARG_COL.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


__all__ = ["ANY", "Bound", "Event", "Executor", "arg_column"]
