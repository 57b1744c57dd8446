"""The planner hook, in both protocols, with a deterministic test-only StatementHandler.

The real ProxyServer runs in-process (its own loop thread) in front of the real test
Postgres; real drivers (psycopg, asyncpg) talk to it. The handler answers
``pgml.test_echo(text)``, ``pgml.test_rows(n)`` (n rows, for portal suspension),
``pgml.test_upstream()`` (runs SQL on the client's upstream session) and
``pgml.test_error()`` (SQLSTATE 22023), so the proxy's side of the contract is proven
without the real planner.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from core.errors import InvalidParameterValue
from core.interfaces import (
    CallContext,
    Column,
    NowStatement,
    Portal,
    PreparedStatement,
    ResultSink,
    StatementDescription,
    UpstreamSession,
    WireValue,
)
from tests.fix_proxy import InProcessProxy

TEXT, INT8 = 25, 20


def _literal(sql: str) -> str:
    found = re.search(r"\(\s*'([^']*)'\s*\)", sql)
    return found.group(1) if found else ""


class EchoPortal:
    def __init__(self, kind: str, value: str, formats: Sequence[int]) -> None:
        self.kind, self.value, self.formats = kind, value, formats
        self.sent = 0

    def _column(self) -> Column:
        fmt = self.formats[0] if self.formats else 0
        return Column("test_rows" if self.kind == "rows" else "test_echo",
                      INT8 if self.kind == "rows" else TEXT, format=fmt)

    def _encode(self, n: int) -> bytes:
        return n.to_bytes(8, "big", signed=True) if self._column().format else str(n).encode()

    async def describe(self, upstream: UpstreamSession) -> list[Column] | None:
        return [self._column()]

    holds_upstream = False  # nothing upstream to close
    name = ""

    def describe_now(self) -> list[Column] | None:
        return None  # every message through the proxy's task path

    def may_execute_now(self) -> bool:
        return False

    def again(self) -> EchoPortal:
        return self

    def execute_now(self) -> tuple[list[WireValue], str] | None:
        return None

    async def close(self, upstream: UpstreamSession) -> None:
        return None

    async def execute(self, upstream: UpstreamSession, sink: ResultSink, ctx: CallContext,
                      max_rows: int = 0) -> bool:
        if self.kind == "error":
            raise InvalidParameterValue("test_error was asked to fail", detail="by the test")
        if self.kind == "upstream":
            res = await upstream.execute("SELECT $1::text || '!'", [self.value.encode()])
            await sink.data_rows([[res.rows[0][0]]])
            await sink.command_complete("SELECT 1")
            return False
        if self.kind == "echo":
            await sink.data_rows([[self.value.encode()]])
            await sink.command_complete("SELECT 1")
            return False
        total = int(self.value)
        todo = total - self.sent if max_rows <= 0 else min(max_rows, total - self.sent)
        await sink.data_rows([[self._encode(self.sent + i + 1)] for i in range(todo)])
        self.sent += todo
        if self.sent < total:
            return True
        await sink.command_complete(f"SELECT {total}")
        return False


class EchoStatement:
    def __init__(self, sql: str, param_oids: Sequence[int]) -> None:
        self.sql = sql
        self.kind = next((k for k in ("rows", "upstream", "error") if f"test_{k}" in sql), "echo")
        self.param_oids = list(param_oids) or ([INT8] if self.kind == "rows" else [TEXT])
        self.has_param = "$1" in sql

    async def describe(self, upstream: UpstreamSession) -> StatementDescription:
        portal = EchoPortal(self.kind, "", [])
        params = self.param_oids if self.has_param else []
        return StatementDescription(params, await portal.describe(upstream))

    async def bind(self, params: Sequence[WireValue], param_formats: Sequence[int],
                   result_formats: Sequence[int]) -> Portal:
        raw = params[0] if params else _literal(self.sql).encode()
        if params and param_formats and param_formats[0] == 1 and raw is not None:
            value = str(int.from_bytes(raw, "big", signed=True)) if self.kind == "rows" else raw.decode()
        else:
            value = (raw or b"").decode()
        return EchoPortal(self.kind, value, result_formats)

    def bind_now(self, params: Sequence[WireValue], param_formats: Sequence[int],
                 result_formats: Sequence[int]) -> Portal | None:
        return None  # every message through the proxy's task path


class EchoHandler:
    """A deterministic StatementHandler standing in for the planner."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def simple_query(self, sql: str, upstream: UpstreamSession, sink: ResultSink,
                           ctx: CallContext) -> None:
        self.calls.append(sql)
        if "test_sleep" in sql:  # planner/runtime work that only a cancel can stop
            await asyncio.sleep(30)
        if "test_error" in sql:
            raise InvalidParameterValue("test_error was asked to fail")
        if "test_upstream" in sql:
            chunks = [c async for c in upstream.stream("SELECT generate_series(1, 5)", chunk_rows=2)]
            results = await upstream.simple("SELECT 40 + 2")
            await ctx.notice(f"{len(chunks)} chunks")
            await sink.row_description([Column("answer", TEXT), Column("chunks", TEXT)])
            await sink.data_rows([[results[0].rows[0][0], str(len(chunks)).encode()]])
            await sink.command_complete("SELECT 1")
            return
        await sink.row_description([Column("test_echo", TEXT)])
        await sink.data_rows([[_literal(sql).encode()]])
        await sink.command_complete("SELECT 1")

    async def parse(self, sql: str, param_oids: Sequence[int]) -> PreparedStatement:
        self.calls.append(sql)
        return EchoStatement(sql, param_oids)

    def now_statement(self, sql: str) -> NowStatement | None:
        return None

    def answer_many(self, items: Sequence[NowStatement | Portal]) -> list[list[WireValue] | None]:
        return [None] * len(items)


@pytest.fixture(scope="module", params=["session", "transaction"])
def hooked(
    request: pytest.FixtureRequest, inprocess_proxy_factory: Callable[..., InProcessProxy]
) -> Iterator[tuple[InProcessProxy, EchoHandler]]:
    handler = EchoHandler()
    yield inprocess_proxy_factory(handler, request.param), handler


def test_simple_query_goes_to_handler(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, handler = hooked
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")  # plain SQL is relayed, never seen by the handler
        cur = conn.cursor()
        cur.execute("SELECT pgml.test_echo('x')", prepare=False)
        assert cur.description is not None and cur.description[0].name == "test_echo"
        assert cur.fetchall() == [("x",)]
        assert conn.pgconn.exec_(b"SELECT pgml.test_echo('simple')").get_value(0, 0) == b"simple"
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert all("pgml" in c for c in handler.calls)


def test_handler_uses_upstream_session(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, _ = hooked
    notices: list[str] = []
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        res = conn.pgconn.exec_(b"SELECT pgml.test_upstream()")
        assert (res.get_value(0, 0), res.get_value(0, 1)) == (b"42", b"3")
        assert notices == ["3 chunks"]
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


def test_handler_error_keeps_connection(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, _ = hooked
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            conn.execute("SELECT pgml.test_error()", prepare=False)
        assert err.value.sqlstate == "22023"
        res = conn.pgconn.exec_(b"SELECT pgml.test_error()")  # the simple protocol
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"22023"
        assert res.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED) == b"ERROR"
        assert res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) == b"test_error was asked to fail"
        assert conn.execute("SELECT 7").fetchone() == (7,)


def test_extended_protocol_params_text_and_binary(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, _ = hooked
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT pgml.test_echo(%s)", ["hello"]).fetchone() == ("hello",)
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT pgml.test_rows(%s::int8)", [3]).fetchall() == [(1,), (2,), (3,)]
        assert conn.execute("SELECT pgml.test_upstream(%s)", ["up"]).fetchone() == ("up!",)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT pgml.test_error(%s)", ["x"])
        assert conn.execute("SELECT %s::int + 1", [1]).fetchone() == (2,)


def test_pipeline_mixes_local_and_relayed(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, _ = hooked
    with psycopg.connect(p.dsn(), autocommit=True) as conn, conn.pipeline():
        curs = []
        for i in range(4):
            curs.append(conn.execute("SELECT %s::int * 10", [i]))
            curs.append(conn.execute("SELECT pgml.test_echo(%s)", [f"e{i}"]))
        got = [c.fetchone() for c in curs]
    assert got == [x for i in range(4) for x in ((i * 10,), (f"e{i}",))]


def test_named_statements_and_portal_suspension(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, _ = hooked
    with psycopg.connect(p.dsn()) as conn:
        for _ in range(3):  # prepare=True: a named statement, answered locally each time
            assert conn.execute("SELECT pgml.test_echo(%s)", ["n"], prepare=True).fetchone() == ("n",)
        with conn.cursor(name="srv") as cur:  # DECLARE goes upstream as SQL: plain relay
            cur.execute("SELECT generate_series(1, 5)")
            assert cur.fetchmany(2) == [(1,), (2,)]
        conn.rollback()

    async def suspended() -> list[int]:
        aconn = await asyncpg.connect(p.dsn())
        try:
            async with aconn.transaction():
                stmt = await aconn.prepare("SELECT pgml.test_rows($1::int8)")
                out = [r[0] async for r in stmt.cursor(7, prefetch=3)]
            assert await aconn.fetchval("SELECT pgml.test_echo($1)", "a") == "a"
            return out
        finally:
            await aconn.close()

    assert asyncio.run(suspended()) == [1, 2, 3, 4, 5, 6, 7]


def test_snapshot_counts_pgml_queries(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    p, _ = hooked
    with psycopg.connect(p.dsn(), autocommit=True, application_name="snapper") as conn:
        conn.pgconn.exec_(b"SELECT pgml.test_echo('s')")
        snap: Any = p.call(p.server.snapshot)
        assert any(c.application_name == "snapper" for c in snap.clients)
        assert snap.counters["pgml_queries"] >= 1
        assert snap.pools and snap.pools[0].mode == p.config.pool_mode
        assert all(s.backend_pid > 0 for s in snap.servers)


def test_cancel_stops_planner_work(hooked: tuple[InProcessProxy, EchoHandler]) -> None:
    import threading
    import time

    p, _ = hooked
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        start = time.monotonic()
        res = conn.pgconn.exec_(b"SELECT pgml.test_sleep()")  # the simple protocol
        timer.join()
        assert res.status == pq.ExecStatus.FATAL_ERROR
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"57014"
        assert time.monotonic() - start < 10
        assert conn.execute("SELECT pgml.test_echo('again')", prepare=False).fetchone() == ("again",)
