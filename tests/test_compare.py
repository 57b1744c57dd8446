"""The comparison harness: each SQL case runs directly against Postgres and through the proxy.

For every case the harness records what a driver sees — command status, column names,
type OIDs, rows (as the driver loads them), COPY data, errors (SQLSTATE, message, detail,
hint), notices, and that the connection still answers afterwards — and the proxy's record
must equal Postgres's. Drivers and formats: psycopg text (simple protocol when there are
no parameters), psycopg with `prepare=True` (named prepared statements, extended, text),
psycopg `binary=True` (extended, binary results), psycopg `ClientCursor` (simple protocol
always) and asyncpg (named prepared statements, binary codecs). Both pool modes.

Each case runs on one connection; with ``tx`` it runs inside a transaction that is rolled
back, so DDL/DML leave nothing behind and transaction pooling keeps one server for it.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest


@dataclass(frozen=True)
class CopyOut:
    query: str  # a SELECT; run as COPY (query) TO STDOUT
    options: str = ""  # e.g. "FORMAT csv, HEADER"
    asyncpg_options: dict[str, Any] = field(default_factory=dict)

    @property
    def sql(self) -> str:
        return f"COPY ({self.query}) TO STDOUT" + (f" WITH ({self.options})" if self.options else "")


@dataclass(frozen=True)
class CopyIn:
    table: str
    data: bytes

    @property
    def sql(self) -> str:
        return f"COPY {self.table} FROM STDIN"


Statement = str | CopyOut | CopyIn


@dataclass(frozen=True)
class Case:
    id: str
    statements: tuple[Statement, ...]
    params: tuple[Any, ...] = ()  # for the first statement, psycopg %s style
    tx: bool = True  # inside a rolled-back transaction
    multi: bool = False  # a statement holds several SQL statements (simple protocol only)


def C(case_id: str, *statements: Statement, **kw: Any) -> Case:
    return Case(case_id, statements, **kw)


TEMP = "CREATE TEMP TABLE t (id int PRIMARY KEY, name text, qty numeric(10,2)) ON COMMIT DROP"

CASES: tuple[Case, ...] = (
    C("int", "SELECT 1::int2 AS a, 2::int4 AS b, 3::int8 AS c, (-2147483648)::int4 AS d,"
      " 9223372036854775807"),
    C("numeric", "SELECT 1.5::numeric, 'NaN'::numeric, 12345678901234567890.123456789, 0.1::numeric(10,3)"),
    C("float", "SELECT 1.5::float4, 'Infinity'::float8, '-0'::float8, 3.141592653589793::float8, 1e-300"),
    C("text", "SELECT 'héllo wörld'::text, 'x'::varchar(3), 'ab'::char(4), 'nm'::name, E'tab\\tnl\\n', ''"),
    C("bool", "SELECT true, false, NULL::bool"),
    C("bytea", "SELECT '\\xdeadbeef'::bytea, ''::bytea, decode('00ff00', 'hex')"),
    C("int_arrays", "SELECT ARRAY[1,2,NULL]::int[], '{{1,2},{3,4}}'::int[], '{}'::int8[]"),
    C("text_arrays", "SELECT ARRAY['a','b c','\"q\"',NULL,'NULL'], ARRAY[1.5,2.5]::float8[]"),
    C("json", "SELECT '{\"a\": [1, 2, null], \"k\": \"v\"}'::json, '[]'::json"),
    C("jsonb", "SELECT '{\"b\": 1, \"a\": {\"c\": [true]}}'::jsonb, 'null'::jsonb, '\"s\"'::jsonb"),
    C("dates_times", "SELECT '2024-02-29'::date, '13:14:15.123456'::time, '13:14:15+02'::timetz"),
    C("timestamp", "SELECT '2024-01-01 12:00:00.5'::timestamp, '1999-12-31 23:59:59'::timestamp"),
    C("timestamptz", "SET LOCAL TimeZone = 'Asia/Kolkata'",
      "SELECT '2024-03-10 02:30:00 America/New_York'::timestamptz, '2024-01-01 00:00+00'::timestamptz"),
    C("interval", "SELECT '1 year 2 mons 3 days 04:05:06.789'::interval, '-1 day'::interval, '0'::interval"),
    C("uuid", "SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL::uuid"),
    C("vector", "SELECT '[1,2,3]'::vector, '[1.5,-2]'::vector <-> '[0,0]'::vector AS dist"),
    C("nulls", "SELECT NULL, NULL::int, NULL::text[], NULL::jsonb"),
    C("ranges", "SELECT int4range(1, 10), '[2024-01-01,2024-02-01)'::daterange, 'empty'::numrange"),
    C("multirange", "SELECT '{[1,3),[5,7)}'::int4multirange"),
    C("record", "SELECT ROW(1, 'a', NULL::int) AS r"),
    C("composite", "SELECT ROW(7, 'x')::cmp_harness.pair AS p"),
    C("network", "SELECT '192.168.0.1/24'::inet, '10.0.0.0/8'::cidr, '08:00:2b:01:02:03'::macaddr"),
    C("oids", "SELECT 'pg_class'::regclass, 1::oid, pg_typeof(1), 'int4'::regtype"),
    C("bits", "SELECT B'101'::bit(3), B'1101'::varbit, CAST(B'1' AS \"bit\")"),
    C("tsvector", "SELECT 'a fat cat sat'::tsvector, to_tsquery('fat & cat')"),
    C("money", "SELECT 12.34::money"),
    C("many_rows", "SELECT g, md5(g::text) FROM generate_series(1, 3000) g"),
    C("wide_value", "SELECT repeat('x', 300000) AS big, length(repeat('y', 10))"),
    C("column_names", "SELECT 1 AS \"Ünïcode col\", 2 AS \"with space\", 3 AS a, 4 AS a"),
    C("empty_result", "SELECT 1 AS a, 'b'::text AS b WHERE false"),
    C("table_read", "SELECT * FROM cmp_harness.items ORDER BY id"),
    C("params", "SELECT %s::int + 1 AS n, %s::text AS t, %s::float8[] AS f", params=(41, "x'y", [1.5, 2.0])),
    C("err_syntax", "SELEC 1"),
    C("err_undefined_table", "SELECT * FROM cmp_harness.no_such_table"),
    C("err_division", "SELECT 1/0"),
    C("err_raise", "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'boom', "
      "DETAIL = 'the detail', HINT = 'the hint'; END $$"),
    C("err_unique", TEMP, "INSERT INTO t VALUES (1, 'a', 1)", "INSERT INTO t VALUES (1, 'b', 2)",
      "SELECT 1"),
    C("err_then_usable", "SELECT 'x'::int", tx=False),
    C("notice", "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$"),
    C("warning", "DO $$ BEGIN RAISE WARNING 'careful' USING DETAIL = 'why'; END $$"),
    C("ddl_tags", "CREATE TEMP TABLE d (a int) ON COMMIT DROP", "CREATE INDEX d_a ON d (a)",
      "ALTER TABLE d ADD COLUMN b text", "CREATE VIEW v AS SELECT a FROM d", "DROP VIEW v", "DROP INDEX d_a",
      "TRUNCATE d"),
    C("dml_tags", TEMP, "INSERT INTO t VALUES (1, 'a', 1.5), (2, 'b', 2.5)",
      "UPDATE t SET qty = qty * 2", "DELETE FROM t WHERE id = 2",
      "INSERT INTO t VALUES (3, 'c', 3) RETURNING id, name, qty",
      "MERGE INTO t USING (VALUES (1), (4)) AS s(id) ON t.id = s.id "
      "WHEN MATCHED THEN UPDATE SET name = 'm' WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'n', 0)",
      "SELECT * FROM t ORDER BY id"),
    C("select_into", "SELECT g AS x INTO TEMP s FROM generate_series(1, 4) g", "SELECT count(*) FROM s"),
    C("copy_out_text", CopyOut("SELECT g, g * 2, NULL::text FROM generate_series(1, 5) g")),
    C("copy_out_csv", CopyOut("SELECT id, name FROM cmp_harness.items ORDER BY id", "FORMAT csv, HEADER",
                              {"format": "csv", "header": True})),
    C("copy_out_binary", CopyOut("SELECT g::int4 FROM generate_series(1, 3) g", "FORMAT binary",
                                 {"format": "binary"})),
    C("copy_in", TEMP, CopyIn("t", b"1\tone\t1.5\n2\ttwo\t\\N\n3\tthree\t3\n"),
      "SELECT * FROM t ORDER BY id"),
    C("tx_tags", "BEGIN", "SAVEPOINT s", "SELECT 1", "ROLLBACK TO SAVEPOINT s", "RELEASE s", "COMMIT",
      tx=False),
    C("tx_failed", "BEGIN", "SELECT 1/0", "SELECT 1", "ROLLBACK", tx=False),
    C("set_show", "SET LOCAL work_mem = '8MB'", "SHOW work_mem", "RESET work_mem"),
    C("sql_prepare", "PREPARE cmp_p(int) AS SELECT $1 * 2", "EXECUTE cmp_p(21)", "DEALLOCATE cmp_p"),
    C("sql_cursor", "DECLARE c CURSOR FOR SELECT generate_series(1, 5)", "FETCH 2 FROM c", "MOVE 1 IN c",
      "FETCH ALL FROM c", "CLOSE c"),
    C("listen_notify", "LISTEN cmp_chan", "NOTIFY cmp_chan, 'payload'", "UNLISTEN cmp_chan"),
    C("explain", "EXPLAIN (COSTS OFF) SELECT * FROM cmp_harness.items WHERE id = 1"),
    C("multi_statement", "SELECT 1 AS one; SELECT 'two' AS two, 2.0; VALUES (3, NULL)", multi=True),
    C("multi_with_error", "SELECT 1; SELECT 1/0; SELECT 3", multi=True),
    C("multi_ddl", "CREATE TEMP TABLE m (a int) ON COMMIT DROP; INSERT INTO m VALUES (1); SELECT * FROM m",
      multi=True),
    C("comment_only", "/* pass-through keeps comments */ SELECT 1 -- trailing\n"),
)


def _setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS cmp_harness CASCADE")
        conn.execute("CREATE SCHEMA cmp_harness")
        conn.execute("CREATE TYPE cmp_harness.pair AS (a int, b text)")
        conn.execute(
            "CREATE TABLE cmp_harness.items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[],"
            " meta jsonb, created timestamptz, emb vector(3))"
        )
        conn.execute(
            "INSERT INTO cmp_harness.items VALUES"
            " (1, 'one', 1.10, '{a,b}', '{\"k\": 1}', '2024-01-01 10:00+00', '[1,2,3]'),"
            " (2, 'two, with comma', NULL, '{}', NULL, '2024-06-01 10:00+02', NULL),"
            " (3, 'three \"quoted\"', 3.33, NULL, '[1, \"x\"]', NULL, '[0,0,0.5]')"
        )


# --- psycopg ------------------------------------------------------------------------------------------

PSYCOPG_MODES = ("text", "prepared", "binary", "client")


def _pg_error(exc: psycopg.Error) -> tuple[Any, ...]:
    diag = exc.diag
    return ("error", exc.sqlstate, diag.message_primary, diag.message_detail, diag.message_hint)


def _psycopg_results(cur: psycopg.Cursor[Any]) -> Iterator[tuple[Any, ...]]:
    while True:
        desc = [(c.name, c.type_code) for c in cur.description] if cur.description is not None else None
        rows = cur.fetchall() if cur.description is not None else None
        yield (cur.statusmessage, desc, rows)
        if not cur.nextset():
            return


def _psycopg_statement(
    conn: psycopg.Connection[Any], mode: str, stmt: Statement, params: tuple[Any, ...]
) -> Any:
    cur: psycopg.Cursor[Any]
    if mode == "client":
        cur = psycopg.ClientCursor(conn)
    else:
        cur = conn.cursor(binary=mode == "binary")
    try:
        if isinstance(stmt, CopyOut):
            with cur.copy(stmt.sql) as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
            return (f"COPY {cur.rowcount}", data)  # psycopg keeps a COPY's count, not its tag
        if isinstance(stmt, CopyIn):
            with cur.copy(stmt.sql) as copy:
                copy.write(stmt.data)
            return (f"COPY {cur.rowcount}",)
        cur.execute(stmt, params or None, prepare=True if mode == "prepared" else None)
        return list(_psycopg_results(cur))
    except psycopg.Error as exc:
        return _pg_error(exc)
    finally:
        cur.close()


def observe_psycopg(dsn: str, mode: str) -> dict[str, Any]:
    """Run every case with psycopg in `mode` on one connection; returns case id -> what was seen."""
    seen: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        notices: list[tuple[Any, ...]] = []
        conn.add_notice_handler(
            lambda d: notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary))
        )
        for case in CASES:
            notices.clear()
            out: list[Any] = []
            if case.tx:
                with conn.transaction(force_rollback=True):
                    for i, stmt in enumerate(case.statements):
                        out.append(_psycopg_statement(conn, mode, stmt, case.params if i == 0 else ()))
            else:
                for i, stmt in enumerate(case.statements):
                    out.append(_psycopg_statement(conn, mode, stmt, case.params if i == 0 else ()))
            after = conn.execute("SELECT 'still usable'").fetchone()
            seen[case.id] = {
                "results": out, "notices": list(notices), "after": after, "tx": conn.info.transaction_status
            }
    return seen


# --- asyncpg ------------------------------------------------------------------------------------------


def _dollar_params(sql: str) -> str:
    counter = iter(range(1, 100))
    return re.sub("%s", lambda _m: f"${next(counter)}", sql)


async def _asyncpg_statement(
    conn: asyncpg.Connection, case: Case, stmt: Statement, params: tuple[Any, ...]
) -> Any:
    try:
        if isinstance(stmt, CopyOut):
            buf = io.BytesIO()
            status = await conn.copy_from_query(stmt.query, output=buf, **stmt.asyncpg_options)
            return (status, buf.getvalue())
        if isinstance(stmt, CopyIn):
            return (await conn.copy_to_table(stmt.table, source=io.BytesIO(stmt.data)),)
        if case.multi:
            return (await conn.execute(stmt),)
        prepared = await conn.prepare(_dollar_params(stmt))
        attrs = [(a.name, a.type.oid) for a in prepared.get_attributes()]
        rows = [tuple(r) for r in await prepared.fetch(*params)]
        return (prepared.get_statusmsg(), attrs, rows)
    except asyncpg.PostgresError as exc:
        return ("error", exc.sqlstate, exc.message, getattr(exc, "detail", None), getattr(exc, "hint", None))


async def observe_asyncpg(dsn: str) -> dict[str, Any]:
    """Run every case with asyncpg on one connection; returns case id -> what was seen."""
    seen: dict[str, Any] = {}
    conn = await asyncpg.connect(dsn)
    notices: list[tuple[Any, ...]] = []
    conn.add_log_listener(lambda _c, m: notices.append((m.severity_en, m.sqlstate, m.message)))
    try:
        for case in CASES:
            notices.clear()
            out: list[Any] = []
            tr = conn.transaction() if case.tx else None
            if tr is not None:
                await tr.start()
            for i, stmt in enumerate(case.statements):
                out.append(await _asyncpg_statement(conn, case, stmt, case.params if i == 0 else ()))
            if tr is not None:
                await tr.rollback()
            await asyncio.sleep(0)  # log listeners are called soon, not at once
            after = await conn.fetchval("SELECT 1")
            seen[case.id] = {"results": out, "notices": list(notices), "after": after}
    finally:
        await conn.close()
    return seen


# --- the tests ----------------------------------------------------------------------------------------

DRIVERS = (*PSYCOPG_MODES, "asyncpg")
TARGETS = {"direct": "pg_dsn", "session": "proxy_dsn", "transaction": "proxy_tx_dsn"}
_observed: dict[tuple[str, str], dict[str, Any]] = {}


@pytest.fixture(scope="module")
def harness_schema(pg_dsn: str) -> None:
    _setup(pg_dsn)


async def _observe(request: pytest.FixtureRequest, target: str, driver: str) -> dict[str, Any]:
    key = (target, driver)
    if key not in _observed:
        dsn = request.getfixturevalue(TARGETS[target])
        if driver == "asyncpg":
            _observed[key] = await observe_asyncpg(dsn)
        else:
            _observed[key] = await asyncio.to_thread(observe_psycopg, dsn, driver)
    return _observed[key]


def test_case_table_is_broad() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
async def test_same_as_postgres(
    request: pytest.FixtureRequest, harness_schema: None, pool_mode: str, driver: str, case_id: str
) -> None:
    direct = (await _observe(request, "direct", driver))[case_id]
    proxied = (await _observe(request, pool_mode, driver))[case_id]
    # repr: NaN never equals itself, and the repr shows every type and value the driver loaded.
    assert repr(proxied) == repr(direct)


async def test_direct_observations_are_real(request: pytest.FixtureRequest, harness_schema: None) -> None:
    """The baseline itself shows what each case is about (the harness compares something real)."""
    seen = await _observe(request, "direct", "binary")
    assert seen["int"]["results"][0][0][2] == [(1, 2, 3, -2147483648, 9223372036854775807)]
    assert seen["err_division"]["results"][0][1] == "22012"
    assert seen["notice"]["notices"] == [("NOTICE", "00000", "hello 42")]
    assert seen["copy_in"]["results"][1] == ("COPY 3",)
    assert seen["dml_tags"]["results"][4][0][0] == "INSERT 0 1"
    text = await _observe(request, "direct", "text")
    assert [r[0] for r in text["multi_statement"]["results"][0]] == ["SELECT 1", "SELECT 1", "SELECT 1"]
    assert text["tx_tags"]["results"][-1][0][0] == "COMMIT"
    apg = await _observe(request, "direct", "asyncpg")
    assert apg["vector"]["results"][0][2][0][1] == pytest.approx(2.5)
