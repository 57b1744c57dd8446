"""The planner through the real proxy (in process) and a real Postgres, with real drivers.

The runtime is `HistRuntime` (deterministic, a real function of its inputs): each
statement's rows are compared, for psycopg text, psycopg binary and asyncpg, with a
reference computed by calling that runtime directly on the same data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from planner import build_handler
from tests.fix_planner import HistRuntime, hist

N = 40


def body(i: int) -> str:
    return f"doc number {i}" + " aei" * (i % 3)


@pytest.fixture(scope="module")
def rt() -> HistRuntime:
    return HistRuntime()


@pytest.fixture(scope="module")
def dsn(inprocess_proxy_factory: Callable[..., Any], pg_dsn: str, rt: HistRuntime) -> Iterator[str]:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS pdocs, pdocs_out, pnums")
        c.execute("CREATE TABLE pdocs (id int PRIMARY KEY, body text, cat int, embedding vector(6))")
        c.execute(
            "INSERT INTO pdocs SELECT i, 'doc number ' || i || repeat(' aei', i %% 3), i %% 4, NULL "
            "FROM generate_series(1, %s) i",
            (N,),
        )
        c.execute("INSERT INTO pdocs VALUES (0, NULL, 0, NULL)")
        c.execute("CREATE TABLE pnums (id int, a real, b real)")
        c.execute("INSERT INTO pnums SELECT i, i, i * 2 FROM generate_series(1, 10) i")
    proxy = inprocess_proxy_factory(build_handler(rt, {"chunk_rows": 7, "materialise_rows": 9}))
    yield proxy.dsn()


def embeds() -> dict[int, list[float] | None]:
    out: dict[int, list[float] | None] = {i: hist(body(i)) for i in range(1, N + 1)}
    out[0] = None
    return out


E = embeds()
# (sql, params, expected rows) — expected computed from the runtime's own function.
SELECTS: list[tuple[str, tuple[Any, ...], list[tuple[Any, ...]]]] = [
    ("SELECT pgml.embed('m', 'hello')", (), [(hist("hello"),)]),
    ("SELECT pgml.embed('m', %s)", ("hello",), [(hist("hello"),)]),
    (
        "SELECT pgml.embed(transformer => 'm', text => 'a b', kwargs => '{\"scale\": 2}')",
        (),
        [([2 * x for x in hist("a b")],)],
    ),
    ("SELECT pgml.embed('m', NULL::text)", (), [(None,)]),
    ("SELECT id, pgml.embed('m', body) FROM pdocs ORDER BY id", (), [(i, E[i]) for i in range(N + 1)]),
    (
        "SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id > %s ORDER BY id",
        (30,),
        [(i, E[i]) for i in range(31, N + 1)],
    ),
    ("SELECT id, pgml.embed('m', body) FROM pdocs ORDER BY 1 LIMIT 3", (), [(i, E[i]) for i in range(3)]),
    (
        "SELECT id FROM pdocs WHERE pgml.embed('m', body) = pgml.embed('m', 'doc number 5') ORDER BY id",
        (),
        [(i,) for i in range(1, N + 1) if E[i] == hist("doc number 5")],
    ),
    (
        "SELECT id FROM pdocs WHERE (pgml.embed('m', body))[3] > 2 ORDER BY id",
        (),
        [(i,) for i in range(1, N + 1) if (E[i] or [0.0] * 3)[2] > 2],
    ),
    (
        "SELECT cat, count(*) FROM pdocs WHERE id > 0 GROUP BY cat, (pgml.embed('m', body))[1] > 13 "
        "ORDER BY 1, 2",
        (),
        None,
    ),  # type: ignore[list-item]
    (
        "WITH x AS (SELECT id, pgml.embed('m', body) AS e FROM pdocs) "
        "SELECT id, e FROM x WHERE id < 4 ORDER BY id",
        (),
        [(i, E[i]) for i in range(4)],
    ),
    (
        "SELECT s.id FROM (SELECT id, pgml.predict('p', ARRAY[a, b]) AS p FROM pnums) s "
        "WHERE s.p > 20 ORDER BY 1",
        (),
        [(i,) for i in range(1, 11) if 3 * i > 20],
    ),
    (
        "SELECT id, pgml.predict('p', ARRAY[a, b]) FROM pnums ORDER BY id",
        (),
        [(i, float(3 * i)) for i in range(1, 11)],
    ),
    (
        "SELECT id, pgml.predict('p', pnums.*) FROM pnums ORDER BY id",
        (),
        [(i, float(4 * i)) for i in range(1, 11)],
    ),
    (
        "SELECT id, pgml.predict_proba('p', ARRAY[a]) FROM pnums WHERE id < 3 ORDER BY id",
        (),
        [(i, [float(i), -float(i)]) for i in range(1, 3)],
    ),
    (
        "SELECT p.id, c.chunk_index, c.chunk FROM pdocs p, LATERAL pgml.chunk('x', p.body) c "
        "WHERE p.id IN (1, 2) "
        "ORDER BY 1, 2",
        (),
        [(i, k, w) for i in (1, 2) for k, w in enumerate(body(i).split(), start=1)],
    ),
    ("SELECT * FROM pgml.chunk('x', 'a bb c')", (), [(1, "a"), (2, "bb"), (3, "c")]),
    ("SELECT * FROM pgml.chunk('x', 'a bb') AS c(i, w)", (), [(1, "a"), (2, "bb")]),
    ("SELECT w, i FROM pgml.chunk('x', 'a bb') AS c(i, w) ORDER BY i DESC", (), [("bb", 2), ("a", 1)]),
    ("SELECT * FROM pgml.embed('m', ARRAY['a', 'bo'])", (), [(hist("a"),), (hist("bo"),)]),
    ("SELECT * FROM pgml.train('p', 'regression', 'pnums', 'b')", (), [("p", "regression", "linear", True)]),
    ("SELECT pgml.transform('t', inputs => ARRAY['ab', 'c'])", (), [(["AB", "C"],)]),
    (
        "SELECT pgml.transform('t', '{}'::jsonb, ARRAY[body]) FROM pdocs WHERE id = 1",
        (),
        [([body(1).upper()],)],
    ),
    ("SELECT pgml.cosine_similarity(ARRAY[1,0]::real[], ARRAY[1,0]::real[]) IS NULL", (), None),  # type: ignore
]
SELECTS = [s for s in SELECTS if s[2] is not None]
SELECTS += [
    ("SELECT * FROM pgml.transform_stream('t', '{}', 'a b c')", (), [("a",), ("b",), ("c",)]),
    (
        "SELECT d.id, s FROM pdocs d, LATERAL pgml.transform_stream('t', '{}', d.body) s WHERE d.id = 1",
        (),
        [(1, w) for w in body(1).split()],
    ),
]


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return [round(x, 4) if isinstance(x, float) else x for x in v]
    return v


def norm(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(_norm(v) for v in r) for r in rows]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(("sql", "params", "expected"), SELECTS)
def test_psycopg(
    dsn: str, sql: str, params: tuple[Any, ...], expected: list[tuple[Any, ...]], binary: bool
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(sql, params or None, prepare=bool(params))  # type: ignore[arg-type]
        assert norm(cur.fetchall()) == norm(expected)
        assert cur.statusmessage == f"SELECT {len(expected)}"


@pytest.mark.parametrize(("sql", "params", "expected"), SELECTS)
async def test_asyncpg(dsn: str, sql: str, params: tuple[Any, ...], expected: list[tuple[Any, ...]]) -> None:
    n = iter(range(1, 10))
    conn = await asyncpg.connect(dsn)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    try:
        rows = await conn.fetch(
            sql.replace("%s", "$%d") % tuple(next(n) for _ in params) if params else sql, *params
        )
        assert norm([tuple(r.values()) for r in rows]) == norm(expected)
    finally:
        await conn.close()


def test_update_insert_ctas_write_the_model_values(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert (
            conn.execute("UPDATE pdocs SET embedding = pgml.embed('m', body)::vector WHERE id < 10").rowcount
            == 10
        )
        got = conn.execute("SELECT id, embedding::real[] FROM pdocs WHERE id < 10 ORDER BY id").fetchall()
        assert norm(got) == norm([(i, E[i]) for i in range(10)])
        conn.execute("DROP TABLE IF EXISTS pdocs_out")
        conn.execute(
            "CREATE TABLE pdocs_out AS SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id < 5"
        )
        conn.execute(
            "INSERT INTO pdocs_out SELECT id, pgml.embed('m', body) FROM pdocs WHERE id BETWEEN 5 AND 6"
        )
        conn.execute("INSERT INTO pdocs_out VALUES (%s, pgml.embed('m', %s))", (100, "zz"))
        # CREATE TABLE AS made `e` a pgvector column with the model's dimensions; INSERTs into it
        # cast real[] on assignment.
        column_type = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'pdocs_out'::regclass AND attname = 'e'"
        ).fetchone()
        assert column_type == (f"vector({len(hist('zz'))})",)
        got = conn.execute("SELECT id, e::real[] FROM pdocs_out ORDER BY id").fetchall()
        assert norm(got) == norm([(i, E[i]) for i in range(7)] + [(100, hist("zz"))])
        top = conn.execute(
            "SELECT id FROM pdocs WHERE embedding IS NOT NULL "
            "ORDER BY embedding <-> pgml.embed('m', %s)::vector, id LIMIT 1",
            (body(3),),
        ).fetchall()
        assert top == [(3,)]
        leftover = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'pgml_%'").fetchone()
        assert leftover == (0,)


def test_failure_writes_nothing_and_aborts_the_transaction(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pfail")
        with pytest.raises(psycopg.errors.UndefinedObject, match="missing"):
            conn.execute("CREATE TABLE pfail AS SELECT id, pgml.embed('missing', body) FROM pdocs")
        assert conn.execute("SELECT to_regclass('pfail')").fetchone() == (None,)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO pnums VALUES (99, 1, 1)")
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("UPDATE pnums SET a = (pgml.embed('missing', 'x'))[1]")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM pnums WHERE id = 99").fetchone() == (0,)


def test_errors_keep_the_connection_usable(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction) as info:
            conn.execute("SELECT pgml.embed('m')")
        assert "pgml.embed(transformer text" in (info.value.diag.message_hint or "")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("CREATE VIEW pv AS SELECT pgml.embed('m', body) FROM pdocs")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_describe_types(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute(
            "SELECT id, pgml.embed('m', body), pgml.embed('m', body)::vector AS v, "
            "pgml.predict('p', ARRAY[1,2]) FROM pdocs WHERE id = %s",
            (1,),
            prepare=True,
        )
        names = [(d.name, d.type_code) for d in cur.description or []]
        vec = conn.execute("SELECT 'vector'::regtype::oid").fetchone()
        assert vec is not None
        assert names == [("id", 23), ("embed", 1021), ("v", vec[0]), ("predict", 700)]


def test_explain_shows_both_plans(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        lines = [r[0] for r in conn.execute("EXPLAIN SELECT id, pgml.embed('m', body) FROM pdocs").fetchall()]
        assert lines[0] == "pgml-proxy plan:"
        assert any("chunks of 7 rows" in line for line in lines)
        assert any("Seq Scan on pdocs" in line for line in lines)
        lines = [
            r[0]
            for r in conn.execute(
                "EXPLAIN UPDATE pdocs SET embedding = pgml.embed('m', body)::vector"
            ).fetchall()
        ]
        assert any("pg_temp.pgml_k1" in line for line in lines)


def test_several_statements_in_one_query(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("SELECT 1 AS a; SELECT pgml.embed('m', 'x') AS e; SELECT 2 AS b")
        assert cur.fetchall() == [(1,)]
        assert cur.nextset() and norm(cur.fetchall()) == norm([(hist("x"),)])
        assert cur.nextset() and cur.fetchall() == [(2,)]


def test_batches_are_chunks(dsn: str, rt: HistRuntime) -> None:
    rt.batches.clear()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT id, pgml.embed('m', body) FROM pdocs").fetchall()
    sizes = [n for f, n in rt.batches if f == "embed"]
    assert sum(sizes) == N and max(sizes) == 7  # the NULL row is never sent to the runtime


async def test_asyncpg_prepared_bind_many_and_portal_suspension(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        stmt = await conn.prepare(
            "SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id <= $1 ORDER BY id"
        )
        assert [a.name for a in stmt.get_attributes()] == ["id", "e"]
        for limit in (1, 3, 5):
            rows = await stmt.fetch(limit)
            assert norm([tuple(r.values()) for r in rows]) == norm([(i, E[i]) for i in range(limit + 1)])
        async with conn.transaction():  # Execute with a row limit: PortalSuspended, then the rest
            sql = "SELECT id, pgml.embed('m', body) FROM pdocs ORDER BY id"
            got = [tuple(r.values()) async for r in conn.cursor(sql, prefetch=4)]
        assert norm(got) == norm([(i, E[i]) for i in range(N + 1)])
    finally:
        await conn.close()


def test_copy_to_stdout_with_row_dependent_calls(dsn: str) -> None:
    """COPY (SELECT ... pgml ...) TO STDOUT gives the rows Postgres would: text, CSV with header, binary."""
    sql = (
        "COPY (SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id BETWEEN 1 AND 4 ORDER BY id)"
        " TO STDOUT"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(sql) as copy:
                text = b"".join(bytes(chunk) for chunk in copy)
            assert cur.rowcount == 4
        lines = text.decode().splitlines()
        assert [int(line.split("\t")[0]) for line in lines] == [1, 2, 3, 4]
        got = [[float(v) for v in line.split("\t")[1].strip("{}").split(",")] for line in lines]
        assert got == [E[i] for i in range(1, 5)]
        csv_sql = sql.replace("TO STDOUT", "TO STDOUT WITH (FORMAT csv, HEADER)")
        with conn.cursor() as cur, cur.copy(csv_sql) as copy:
            csv = b"".join(bytes(chunk) for chunk in copy).decode().splitlines()
        assert csv[0] == "id,e" and len(csv) == 5
        with conn.cursor() as cur, cur.copy(sql.replace("TO STDOUT", "TO STDOUT (FORMAT binary)")) as copy:
            copy.set_types(["int4", "float4[]"])
            rows = list(copy.rows())
        assert [(r[0], [float(v) for v in r[1]]) for r in rows] == [(i, E[i]) for i in range(1, 5)]
        # The connection is still usable, and a failing model fails the COPY with its SQLSTATE.
        with pytest.raises(psycopg.Error) as err, conn.cursor() as cur:
            with cur.copy("COPY (SELECT pgml.embed('missing', body) FROM pdocs) TO STDOUT") as copy:
                list(copy)
        assert err.value.sqlstate == "42704"
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_copy_to_stdout_through_asyncpg(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        out: list[bytes] = []

        async def sink(data: bytes) -> None:
            out.append(data)

        tag = await conn.copy_from_query(
            "SELECT id, pgml.embed('m', body) FROM pdocs WHERE id BETWEEN 1 AND 2 ORDER BY id", output=sink
        )
        assert tag == "COPY 2"
        lines = b"".join(out).decode().splitlines()
        assert [line.split("\t")[0] for line in lines] == ["1", "2"]
    finally:
        await conn.close()


def test_server_side_cursors_fetch_model_values(dsn: str) -> None:
    """DECLARE ... CURSOR FOR SELECT ... pgml ...: psycopg's named cursors, FETCH in steps,
    two cursors in one transaction, WITH HOLD outside one, and Postgres's own errors."""
    sql = "SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id BETWEEN 1 AND 30 ORDER BY id"
    want = [(i, E[i]) for i in range(1, 31)]
    with psycopg.connect(dsn) as conn:
        with conn.cursor(name="emb") as cur:
            cur.itersize = 7  # FETCH FORWARD 7 at a time, as psycopg does
            cur.execute(sql)
            got = [(i, [float(v) for v in e]) for i, e in cur]
        assert got == want
        # Two cursors of different statements, read interleaved in one transaction.
        conn.execute(f"DECLARE a CURSOR FOR {sql}")
        conn.execute("DECLARE b CURSOR FOR SELECT pgml.embed('m', body) FROM pdocs WHERE id = 40")
        first = conn.execute("FETCH 2 FROM a").fetchall()
        assert conn.execute("FETCH ALL FROM b").fetchall() == [(E[40],)]
        rest = conn.execute("FETCH ALL FROM a").fetchall()
        assert [(i, [float(v) for v in e]) for i, e in first + rest] == want
        # Postgres's answer to a second cursor of one name; the first still reads.
        conn.execute("CLOSE a")
        conn.execute("DECLARE a CURSOR FOR SELECT id, pgml.embed('m', body) FROM pdocs WHERE id = 1")
        with pytest.raises(psycopg.errors.DuplicateCursor):
            conn.execute("DECLARE a CURSOR FOR SELECT id, pgml.embed('m', body) FROM pdocs WHERE id = 1")
        conn.rollback()
        # Re-declaring the same statement after CLOSE in one transaction reads fresh tables.
        for _ in range(2):
            conn.execute("DECLARE c CURSOR FOR SELECT pgml.embed('m', body) FROM pdocs WHERE id = 2")
            assert conn.execute("FETCH 1 FROM c").fetchall() == [(E[2],)]
            conn.execute("CLOSE c")
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.NoActiveSqlTransaction):
            conn.execute("DECLARE d CURSOR FOR SELECT pgml.embed('m', body) FROM pdocs")
        # WITH HOLD: materialised at its commit, readable after it.
        conn.execute(
            "DECLARE h CURSOR WITH HOLD FOR"
            " SELECT id, pgml.embed('m', body) FROM pdocs WHERE id < 4 ORDER BY id"
        )
        held = conn.execute("FETCH ALL FROM h").fetchall()
        got_held = [(i, None if e is None else [float(v) for v in e]) for i, e in held]
        assert got_held == [(i, E[i]) for i in range(4)]
        conn.execute("CLOSE h")
        left = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'pgml_%' AND relpersistence = 't'"
        )
        assert left.fetchone() == (0,)  # the cursors' tables went with their transactions


def test_untyped_parameters_inside_materialised_calls(dsn: str) -> None:
    """psycopg sends str parameters untyped: inside a materialised call's arguments (a CREATE
    TABLE AS upstream, which infers no types) the proxy learns their types from Postgres."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        sql = "SELECT id FROM pdocs WHERE pgml.embed('m', %s || body) = %s::real[] ORDER BY id"
        want = [(i,) for i in range(1, N + 1) if hist("x " + body(i)) == hist("x " + body(3))]
        assert (3,) in want and conn.execute(sql, ["x ", hist("x " + body(3))]).fetchall() == want
        # An unreferenced lower-numbered parameter, and the same inside a cursor.
        rows = conn.execute(
            "SELECT id FROM pdocs WHERE id < %s AND pgml.embed('m', %s || body) IS NOT NULL ORDER BY id",
            [3, "y"],
        ).fetchall()
        assert rows == [(1,), (2,)]
    with psycopg.connect(dsn) as conn, conn.cursor(name="typed") as cur:
        cur.execute("SELECT pgml.embed('m', %s || body) FROM pdocs WHERE id = 5", ["z "])
        assert [[float(v) for v in r[0]] for r in cur] == [hist("z " + body(5))]


async def test_row_limited_portals_read_from_an_upstream_cursor(dsn: str) -> None:
    """asyncpg's cursors Execute with a row limit: inside a transaction the rest of the rows
    wait in an upstream cursor (not in the proxy), and other statements can run in between."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            sql = "SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id >= $1 ORDER BY id"
            cur = await conn.cursor(sql, 1)
            first = await cur.fetch(5)
            names = [r["name"] for r in await conn.fetch("SELECT name FROM pg_cursors")]
            assert any(n.startswith("pgml_portal_") for n in names)
            # Another pgml statement between two fetches of the portal.
            assert norm([tuple(await conn.fetchrow("SELECT 7, pgml.embed('m', 'other')"))]) == norm(
                [(7, hist("other"))]
            )
            second = await cur.fetch(5)
            rest = await cur.fetch(100)
            got = [tuple(r.values()) for r in first + second + rest]
            assert norm(got) == norm([(i, E[i]) for i in range(1, N + 1)])
            # fetchrow of a row-dependent statement: a one-row limit, then asyncpg closes the portal.
            one = await conn.fetchrow("SELECT id, pgml.embed('m', body) AS e FROM pdocs WHERE id = 2")
            assert norm([tuple(one)]) == norm([(2, E[2])])
            # The next pgml statement releases what the replaced portal held upstream (at the
            # latest, the transaction's end does).
            assert len(await conn.fetchval("SELECT pgml.embed('m', 'next')")) == 6
            # Closed: the exhausted portal's cursor and fetchrow's; "" is this query's own portal.
            assert [r["name"] for r in await conn.fetch("SELECT name FROM pg_cursors")] == [""]
    finally:
        await conn.close()


def test_identical_constant_calls_run_once(dsn: str, rt: HistRuntime) -> None:
    """The vector-search idiom names the query embedding twice: it is computed once. A sampling
    function (transform) is not merged: each of its calls runs, as Postgres would run them."""
    rt.batches.clear()
    q = "1 - (embedding <=> pgml.embed('m', 'q')::vector)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pdocs SET embedding = %s::vector WHERE id BETWEEN 1 AND 3", [hist("x")])
        rows = conn.execute(
            f"SELECT id, {q} AS score, pgml.embed('m', 'other') AS o FROM pdocs WHERE id BETWEEN 1 AND 3 "
            "ORDER BY embedding <=> pgml.embed('m', 'q')::vector, id"
        ).fetchall()
        conn.execute("UPDATE pdocs SET embedding = NULL")
    assert [r[0] for r in rows] == [1, 2, 3] and [float(v) for v in rows[0][2]] == hist("other")
    assert sorted(n for f, n in rt.batches if f == "embed") == [1, 1]  # 'q' once, 'other' once
    rt.batches.clear()
    with psycopg.connect(dsn, autocommit=True) as conn:
        twice = "pgml.transform('text-generation', inputs => ARRAY['a'])"
        conn.execute(f"SELECT {twice}, {twice}, id FROM pdocs WHERE id = 1").fetchall()
    assert [f for f, _ in rt.batches] == ["transform", "transform"]
