"""The contracts between proxy/, planner/ and runtime/: the protocols, and the value types that
cross them (no behaviour beyond reading those values).

proxy/ implements `UpstreamSession` and `ResultSink` and calls a `StatementHandler`
(implemented by planner/) for every statement whose text mentions ``pgml``.
planner/ calls the `Runtime` (implemented by runtime/) with Python values and never
sees sockets; runtime/ never sees wire bytes or SQL text written by clients.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from core.stop import Stop

# A wire value: the bytes of one field in the format it was asked for, or None for SQL NULL.
WireValue = bytes | None


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a RowDescription, exactly as Postgres describes it."""

    name: str
    type_oid: int
    table_oid: int = 0
    column_attr: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0  # 0 text, 1 binary


class ColumnCalls(Sequence[Mapping[str, Any]]):
    """One chunk's calls of one function, given column-wise: `fixed` holds the arguments every
    row shares, `columns` one array per row-dependent argument, row i's value at index i (a 2-D
    NumPy matrix for predict's features over a table: no Python object per row).

    A runtime that reads columns takes them whole (`Runtime.call_batch` of a tabular predict);
    anything else sees it as the per-row mappings it stands for, built on demand.
    """

    __slots__ = ("columns", "fixed", "rows")

    def __init__(self, fixed: Mapping[str, Any], columns: Mapping[str, Any], rows: int) -> None:
        self.fixed, self.columns, self.rows = fixed, columns, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.rows))]
        if not -self.rows <= i < self.rows:
            raise IndexError(i)
        row = dict(self.fixed)
        for name, values in self.columns.items():
            row[name] = values[i]
        return row


@dataclass(slots=True)
class QueryResult:
    """The complete result of one statement run upstream."""

    columns: list[Column] | None  # None: the statement returns no rows (no RowDescription)
    # A list, or from `UpstreamSession.stream` a `core.datarows.RowBlock`: the rows as their
    # wire bytes, read column-wise (or row by row, on demand).
    rows: Sequence[Sequence[WireValue]]
    command_tag: str
    notices: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StatementDescription:
    """What Describe of a prepared statement answers."""

    param_oids: list[int]
    columns: list[Column] | None


class UpstreamSession(Protocol):
    """The client's own server connection, held for the duration of one statement.

    Implemented by proxy/. Every method raises `core.errors.PgError` (carrying every
    ErrorResponse field) when the upstream answers with an error; the session then
    stays usable once the proxy has synced it (the implementation does the Sync).
    """

    @property
    def transaction_status(self) -> str:
        """'I' idle, 'T' in a transaction block, 'E' in a failed transaction block."""
        ...

    async def simple(self, sql: str) -> list[QueryResult]:
        """Run `sql` with the simple query protocol (several statements allowed); text results."""
        ...

    async def execute(
        self,
        sql: str,
        params: Sequence[WireValue] = (),
        *,
        param_oids: Sequence[int] = (),
        param_formats: Sequence[int] = (),
        result_formats: Sequence[int] = (),
    ) -> QueryResult:
        """Run one statement with the extended protocol (unnamed statement and portal)."""
        ...

    def stream(
        self,
        sql: str,
        params: Sequence[WireValue] = (),
        *,
        param_oids: Sequence[int] = (),
        param_formats: Sequence[int] = (),
        result_formats: Sequence[int] = (),
        chunk_rows: int = 1000,
        grow_to_bytes: int = 0,
    ) -> AsyncGenerator[QueryResult, None]:
        """Run one statement and yield its rows in chunks of at most `chunk_rows`; with
        `grow_to_bytes`, a chunk of less than half that many bytes makes the next one twice as
        many rows (per-chunk costs, a model call's among them, shrink for narrow rows).

        A generator: a consumer that stops early closes it (`aclose`), which syncs the upstream
        portal, so nothing of this statement's replies is left on the connection.

        Uses Execute with a row limit (PortalSuspended) so memory stays bounded. Every
        chunk carries the columns; the last one carries the command tag, the others "".
        """
        ...

    async def describe(self, sql: str, param_oids: Sequence[int] = ()) -> StatementDescription:
        """Parse (unnamed) and Describe `sql` upstream without running it."""
        ...

    async def copy_in(self, sql: str, data: bytes | AsyncIterator[bytes]) -> str:
        """Run a `COPY ... FROM STDIN` and feed it `data`; returns the command tag."""
        ...

    def copy_out(
        self,
        sql: str,
        params: Sequence[WireValue] = (),
        *,
        param_oids: Sequence[int] = (),
        param_formats: Sequence[int] = (),
    ) -> AsyncIterator[bytes | str]:
        """Run a `COPY ... TO STDOUT`; yield each CopyOutResponse/CopyData/CopyDone message.

        The bytes items are whole protocol messages, to be relayed to the client as they are;
        the last item is the command tag (a str).
        """
        ...


class ResultSink(Protocol):
    """Where the planner writes what the client must see. Implemented by proxy/.

    The sink encodes the protocol messages; the planner gives field values already
    encoded in the client's requested format (psycopg's dumpers do that).
    """

    async def row_description(self, columns: Sequence[Column]) -> None: ...

    async def data_rows(self, rows: Sequence[Sequence[WireValue]]) -> None: ...

    async def command_complete(self, tag: str) -> None: ...

    async def notice(self, fields: Mapping[str, str]) -> None:
        """Send a NoticeResponse; `fields` keys are the one-letter codes (S, V, C, M, ...)."""
        ...

    async def copy_message(self, message: bytes) -> None:
        """Relay one CopyOutResponse/CopyData/CopyDone message from the upstream as it is."""
        ...


@dataclass
class CallContext:
    """Per-statement context the planner hands to runtime calls."""

    # Sends an INFO/NOTICE to the client right away (training progress and the like).
    notice: Callable[[str], Awaitable[None]]
    # Connection parameters of the client (user, database, application_name).
    user: str = ""
    database: str = ""
    # The client's upstream session, for functions that must see its transaction.
    upstream: UpstreamSession | None = None
    # The statement's stop scope: a cancel, the client's statement_timeout or its disconnect.
    # Runtime work stops when it is stopped (queued items dropped, threads at their next check).
    stop: Stop = field(default_factory=Stop)
    # The client's statement_timeout in ms when the proxy knows it (0: none). None: not known
    # (never read, or changed since): the planner reads it on the client's server connection
    # before the statement's model work and hands the value to `timeout_read`.
    statement_timeout: float | None = 0.0
    timeout_read: Callable[[float], None] | None = None
    # Sends a WARNING notice (an option accepted but not applied, and why); None: as INFO.
    warn: Callable[[str], Awaitable[None]] | None = None

    async def warning(self, message: str) -> None:
        await (self.warn or self.notice)(message)


@runtime_checkable
class Runtime(Protocol):
    """All model work. Implemented by runtime/ (`runtime.Runtime`).

    Function names are the pgml function names without the schema (``embed``,
    ``transform``, ``predict``, ``train``, ...). Each call is a mapping from the
    argument names declared in `core.functions` (the SQL names) to Python values,
    defaults already applied, NULL-in-gives-NULL-out already handled by the planner:
    text -> str, jsonb -> dict/list/str/number, real[]/float8[] -> list[float] (or a
    numpy array), bigint/int -> int, bool -> bool, text[] -> list[str], jsonb[] -> list,
    a row (``t.*``) -> dict column name -> value.
    """

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        """Run `function` for every call (batched inside) and return one result per call.

        Scalar functions return the value (list[float] for real[], JSON-able Python for
        jsonb, float for real, str for text). Set-returning functions return, per call,
        a list of row tuples in the reference's column order.
        Raises `core.errors.PgError` subclasses with the right SQLSTATE.
        """
        ...

    def stream(self, function: str, call: Mapping[str, Any], ctx: CallContext) -> AsyncIterator[Any]:
        """Yield the rows of a streaming function (``transform_stream``) as they are made."""
        ...

    def call_now(self, function: str, calls: Sequence[Mapping[str, Any]]) -> list[Any] | None:
        """`call_batch`'s results when they can be had at once, on the caller's thread, without
        waiting for anything (a loaded compiled model's few rows, measured cheap): the same
        values, and the same errors raised. None when the calls must go through `call_batch`.
        The planner's fast path (a statement answered with no task and no await) asks this."""
        ...


class PreparedStatement(Protocol):
    """A statement that mentions pgml, parsed by the planner at Parse time."""

    async def describe(self, upstream: UpstreamSession) -> StatementDescription: ...

    async def bind(
        self,
        params: Sequence[WireValue],
        param_formats: Sequence[int],
        result_formats: Sequence[int],
    ) -> Portal: ...

    def bind_now(
        self,
        params: Sequence[WireValue],
        param_formats: Sequence[int],
        result_formats: Sequence[int],
    ) -> Portal | None:
        """`bind` when it needs no waiting (None: use `bind`); raises as `bind` would."""
        ...


class Portal(Protocol):
    name: str  # the client's name for it (set by the proxy at Bind), for Postgres's messages

    async def describe(self, upstream: UpstreamSession) -> list[Column] | None: ...

    async def execute(
        self, upstream: UpstreamSession, sink: ResultSink, ctx: CallContext, max_rows: int = 0
    ) -> bool:
        """Write DataRows (and CommandComplete when done) to `sink`.

        Returns True when the portal was suspended by `max_rows` (the proxy then sends
        PortalSuspended and a later Execute continues), False when it completed.
        Does not send RowDescription (the extended protocol sends it on Describe).
        """
        ...

    def describe_now(self) -> list[Column] | None:
        """`describe` when the answer is known without asking the upstream; None otherwise."""
        ...

    def may_execute_now(self) -> bool:
        """Whether `execute_now` (or `StatementHandler.answer_many`) may answer this portal; they
        may still give None, when the runtime cannot answer at once."""
        ...

    def again(self) -> Portal:
        """A new portal of the same statement with the same parameters and result formats, as
        the same Bind again would give (the fast path of a repeated batch), named as this one."""
        ...

    def execute_now(self) -> tuple[list[WireValue], str] | None:
        """The fast path of an unlimited Execute: the one row and the command tag when the
        portal's statement is answered at once, with no await (see `StatementHandler.now_statement`);
        None when `execute` must run it. Never raises for a statement's own errors: `execute`
        reports those."""
        ...

    @property
    def holds_upstream(self) -> bool:
        """Whether `close` has something to release upstream (an open cursor)."""
        ...

    async def close(self, upstream: UpstreamSession) -> None:
        """The client closed the portal, or bound another under its name: release what it
        holds upstream. Must not fail the client's transaction."""
        ...


class NowStatement(Protocol):
    """A simple Query the fast path answers (`StatementHandler.now_statement`), as often as it
    comes: its columns never change, its one row is computed at each `answer`."""

    @property
    def columns(self) -> Sequence[Column]: ...

    def answer(self) -> list[WireValue] | None:
        """The one row, when the runtime answers every call at once; None when `simple_query`
        must run it (errors included: that path reports them)."""
        ...


class StatementHandler(Protocol):
    """The planner hook: the one place where the proxy hands over pgml statements."""

    def answer_many(self, items: Sequence[NowStatement | Portal]) -> list[list[WireValue] | None]:
        """`NowStatement.answer` and `Portal.execute_now` (a portal answered so is completed, its
        tag SELECT 1) for the statements of many clients at once, those that came in one turn of
        the event loop: one model call for the rows of the same model, which is what makes
        one-row statements from many connections cheap. None where the general path must run
        that statement or portal (its error included)."""
        ...

    async def simple_query(
        self, sql: str, upstream: UpstreamSession, sink: ResultSink, ctx: CallContext
    ) -> None:
        """Answer a whole simple-protocol Query message (one or more statements).

        Writes RowDescription/DataRow/CommandComplete for each statement to `sink`;
        raises PgError on the first failing statement (the proxy writes the
        ErrorResponse and then ReadyForQuery).
        """
        ...

    async def parse(self, sql: str, param_oids: Sequence[int]) -> PreparedStatement:
        """Analyse a Parse message's text; raises PgError for SQL it cannot accept."""
        ...

    def now_statement(self, sql: str) -> NowStatement | None:
        """The fast path of a simple Query: the statement when it may be answered at once, with
        no task, no await and no upstream round trip (its only work is pgml calls on literals:
        `Runtime.call_now`); None when `simple_query` must run it. Never raises for a
        statement's own errors (`simple_query` reports them). The same object serves the same
        text again: the proxy keeps it for the Query that sent it."""
        ...

