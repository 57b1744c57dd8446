"""The fast path for statements whose only work is constant pgml calls (planner/handler.py).

Two parts: Describe answered from a cache, and the statement answered at once (a simple
Query, or Bind/Describe/Execute) with no task, await or upstream round trip when the runtime
can (`Runtime.call_now`: a loaded ONNX model's row, run on the event loop).
Differential: the same statements, simple and extended protocol (psycopg text and binary,
prepared and not; libpq's prepared Bind/Describe portal/Execute as pgbench -M prepared sends
them; asyncpg, which describes every statement), through a proxy with
`planner.fast_path = true` (the default) and one with it off, on the same model: the same
rows, column names, column types and SQLSTATEs, on the first execution and on repeats, and
inside transaction blocks with a failing statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from tests.fix_postgres import PgServer
from tests.fix_proxy import TEST_CONFIG, ProxyProcess
from tests.test_tabular_support import new_database

pytestmark = pytest.mark.slow
P = "fp iris"
SETOSA = "ARRAY[5.1, 3.5, 1.4, 0.2]"
SIMPLE = [
    f"SELECT pgml.predict('{P}', {SETOSA})",
    f"SELECT pgml.predict('{P}', {SETOSA}) AS a, pgml.predict_proba('{P}', ARRAY[6.7, 3.0, 5.2, 2.3]) AS b",
    f"SELECT pgml.predict('{P}', {SETOSA}::real[]) + 1 AS shifted",
    f"SELECT pgml.predict('{P}', NULL::real[])",
    f"SELECT pgml.predict('{P}', {SETOSA}) AS a, pgml.predict('{P}', NULL::real[]) AS b",
    f"SELECT pgml.predict_proba('{P}', ARRAY[6.7, 3.0, 5.2, 2.3]::float8[])",
    f"SELECT pgml.predict('no such project', {SETOSA})",
    f"SELECT pgml.predict('{P}', ARRAY[1.0, 2.0])",
    f"SELECT pgml.predict('{P}', 'not an array')",
    f"SELECT pgml.predict('{P}', {SETOSA}); SELECT 1",
]
PARAMS: list[tuple[str, tuple[Any, ...]]] = [
    ("SELECT pgml.predict(%s, %s)", (P, [5.1, 3.5, 1.4, 0.2])),
    ("SELECT pgml.predict(%s, %s::real[]) AS p", (P, [6.7, 3.0, 5.2, 2.3])),
    ("SELECT pgml.predict_proba(%s, %s)", (P, [6.7, 3.0, 5.2, 2.3])),
    ("SELECT pgml.predict(%s, %s)", (P, [1.0])),
    ("SELECT pgml.predict(%s, %s)", ("missing", [1.0, 2.0, 3.0, 4.0])),
    ("SELECT pgml.predict(%s, %s::real[])", (P, None)),
    ("SELECT pgml.predict(%s, %s::real[]) AS p, %s::int AS n", (P, [5.1, 3.5, 1.4, 0.2], 7)),
]
ASYNCPG: list[tuple[str, tuple[Any, ...]]] = [
    ("SELECT pgml.predict($1, $2::real[])", (P, [5.1, 3.5, 1.4, 0.2])),
    (
        "SELECT pgml.predict($1, $2::real[]) AS x, pgml.predict_proba($1, $2::real[]) AS y",
        (P, [6.7, 3.0, 5.2, 2.3]),
    ),
    ("SELECT pgml.predict($1, $2::real[])", (P, [1.0, 2.0])),
]


@pytest.fixture(scope="module")
def proxies(
    pg_server: PgServer,
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, ProxyProcess, ProxyProcess]]:
    dsn = new_database(pg_server, "fastpath")
    db = dsn.rsplit("/", 1)[1]
    fast = proxy_factory("session", upstream=dsn)
    config: Path = tmp_path_factory.mktemp("slow") / "config.toml"
    config.write_text(TEST_CONFIG.read_text().replace("[planner]\n", "[planner]\nfast_path = false\n"))
    slow = proxy_factory("session", upstream=dsn, config=config)
    with psycopg.connect(fast.dsn(database=db), autocommit=True) as conn:
        conn.execute("SELECT * FROM pgml.load_dataset('iris')")
        conn.execute(f"SELECT * FROM pgml.train('{P}', 'classification', 'pgml.iris', 'target',"
                     " algorithm => 'xgboost', hyperparams => '{\"n_estimators\": 5}')")
    yield db, fast, slow
    slow.stop()
    fast.stop()


def _psycopg(proxy: ProxyProcess, db: str, work: Callable[[psycopg.Connection[Any]], Any]) -> list[Any]:
    out: list[Any] = []
    with psycopg.connect(proxy.dsn(database=db), autocommit=True) as conn:
        for _ in range(3):  # the first execution fills the caches; the repeats read them
            try:
                cur = work(conn)
                out.append((
                    [(d.name, d.type_code) for d in cur.description or []],
                    cur.fetchall() if cur.description is not None else None,
                ))
            except psycopg.Error as exc:
                out.append(("error", exc.sqlstate))
        out.append(conn.execute("SELECT 2").fetchall())  # the connection stays usable
    return out


@pytest.mark.parametrize("sql", SIMPLE)
def test_simple_query_same_with_and_without_fast_path(
    proxies: tuple[str, ProxyProcess, ProxyProcess], sql: str
) -> None:
    db, fast, slow = proxies

    def simple(conn: psycopg.Connection[Any]) -> Any:
        cur = psycopg.ClientCursor(conn)
        return cur.execute(sql)

    got = _psycopg(fast, db, simple)
    assert got == _psycopg(slow, db, simple)
    assert ("error", "XX000") not in got


@pytest.mark.parametrize(("sql", "args"), PARAMS)
@pytest.mark.parametrize("mode", ["text", "binary", "prepared"])
def test_extended_same_with_and_without_fast_path(
    proxies: tuple[str, ProxyProcess, ProxyProcess], sql: str, args: tuple[Any, ...], mode: str
) -> None:
    db, fast, slow = proxies

    def run(conn: psycopg.Connection[Any]) -> Any:
        cur = conn.cursor(binary=mode == "binary")
        return cur.execute(sql, args, prepare=mode == "prepared")

    got = _psycopg(fast, db, run)
    assert got == _psycopg(slow, db, run)
    assert ("error", "XX000") not in got


async def _asyncpg(proxy: ProxyProcess, db: str, sql: str, args: tuple[Any, ...]) -> list[Any]:
    out: list[Any] = []
    conn = await asyncpg.connect(proxy.dsn(database=db))
    try:
        for _ in range(2):
            try:
                stmt = await conn.prepare(sql)
                types = [(a.name, a.type.oid) for a in stmt.get_attributes()]
                params = [t.oid for t in stmt.get_parameters()]
                out.append((types, params, [tuple(r) for r in await stmt.fetch(*args)]))
            except asyncpg.PostgresError as exc:
                out.append(("error", exc.sqlstate))
        out.append(await conn.fetchval("SELECT 3"))
    finally:
        await conn.close()
    return out


@pytest.mark.parametrize(("sql", "args"), ASYNCPG)
async def test_asyncpg_same_with_and_without_fast_path(
    proxies: tuple[str, ProxyProcess, ProxyProcess], sql: str, args: tuple[Any, ...]
) -> None:
    db, fast, slow = proxies
    got = await _asyncpg(fast, db, sql, args)
    assert got == await _asyncpg(slow, db, sql, args)
    assert ("error", "XX000") not in got


def _block(proxy: ProxyProcess, db: str) -> list[Any]:
    """A transaction block: predicts before and after a failing one (25P02 until ROLLBACK)."""
    out: list[Any] = []
    with psycopg.connect(proxy.dsn(database=db)) as conn:
        for sql in (
            f"SELECT pgml.predict('{P}', {SETOSA})",
            f"SELECT pgml.predict('{P}', ARRAY[1.0])",
            f"SELECT pgml.predict('{P}', {SETOSA})",
        ):
            for prepare in (False, True):
                try:
                    out.append(conn.execute(sql, prepare=prepare).fetchall())
                except psycopg.Error as exc:
                    out.append(("error", exc.sqlstate))
                out.append(conn.info.transaction_status.name)
        conn.rollback()
        out.append(conn.execute(f"SELECT pgml.predict('{P}', {SETOSA})").fetchall())
    return out


def test_transaction_block_same_with_and_without_fast_path(
    proxies: tuple[str, ProxyProcess, ProxyProcess],
) -> None:
    db, fast, slow = proxies
    got = _block(fast, db)
    assert got == _block(slow, db)
    assert ("error", "22023") in got and ("error", "25P02") in got


def _libpq_prepared(proxy: ProxyProcess, db: str) -> list[Any]:
    """pgbench -M prepared's messages: Parse once, then Bind, Describe portal, Execute, Sync."""
    out: list[Any] = []
    with psycopg.connect(proxy.dsn(database=db), autocommit=True) as conn:
        pgconn = conn.pgconn
        for name, sql in ((b"a", f"SELECT pgml.predict('{P}', {SETOSA})".encode()),
                          (b"b", f"SELECT pgml.predict('{P}', ARRAY[1.0, 2.0])".encode())):
            res = pgconn.prepare(name, sql)
            out.append(res.status)
            for _ in range(4):
                res = pgconn.exec_prepared(name, [])
                out.append((res.status, res.error_field(pq.DiagnosticField.SQLSTATE),
                            [res.fname(i) for i in range(res.nfields)],
                            [res.ftype(i) for i in range(res.nfields)],
                            [res.get_value(r, 0) for r in range(res.ntuples)]))
        out.append(conn.execute("SELECT 4").fetchall())
    return out


def test_libpq_prepared_same_with_and_without_fast_path(
    proxies: tuple[str, ProxyProcess, ProxyProcess],
) -> None:
    db, fast, slow = proxies
    got = _libpq_prepared(fast, db)
    assert got == _libpq_prepared(slow, db)
    assert any(r[1] == b"22023" for r in got if isinstance(r, tuple))


def _outcome(pgconn: pq.abc.PGconn, res: pq.abc.PGresult) -> tuple[Any, ...]:
    """What a client sees of one result: status, SQLSTATE, column types, first column, and the
    transaction status after it."""
    return (res.status, res.error_field(pq.DiagnosticField.SQLSTATE),
            [res.ftype(i) for i in range(res.nfields)],
            [res.get_value(r, 0) for r in range(res.ntuples)],
            pq.TransactionStatus(pgconn.transaction_status).name)


def _libpq_again(proxy: ProxyProcess, db: str) -> list[Any]:
    """The same Bind/Describe/Execute/Sync bytes again and again (the second and later are
    answered from the batch kept by LocalStatements.answered_batch_again): after the statement
    under that name is closed and prepared again with other SQL (the same bytes, another
    answer: an error), after it is closed for good (26000), and in a block around a failing
    statement (25P02 until ROLLBACK)."""
    good = f"SELECT pgml.predict('{P}', {SETOSA})".encode()
    bad = f"SELECT pgml.predict('{P}', ARRAY[1.0, 2.0])".encode()
    out: list[Any] = []
    with psycopg.connect(proxy.dsn(database=db), autocommit=True) as conn:
        pgconn = conn.pgconn

        def run(res: pq.abc.PGresult) -> None:
            out.append(_outcome(pgconn, res))

        for name in (b"a", b""):  # a named statement, and the unnamed one
            run(pgconn.prepare(name, good))
            for _ in range(3):
                run(pgconn.exec_prepared(name, []))
            run(pgconn.close_prepared(name))
            run(pgconn.prepare(name, bad))
            for _ in range(2):
                run(pgconn.exec_prepared(name, []))
            run(pgconn.close_prepared(name))
            run(pgconn.exec_prepared(name, []))
            run(pgconn.prepare(name, good))
            for sql in (b"BEGIN", None, None, b"SELECT 1/0", None, b"ROLLBACK", None, None):
                run(pgconn.exec_(sql) if sql is not None else pgconn.exec_prepared(name, []))
        out.append(conn.execute("SELECT 4").fetchall())
    return out


@pytest.fixture(scope="module")
def tx_proxies(
    proxies: tuple[str, ProxyProcess, ProxyProcess],
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, ProxyProcess, ProxyProcess]]:
    """The same database and model behind a fast and a slow proxy in transaction pooling."""
    db, fast, _ = proxies
    upstream = fast.upstream.rsplit("/", 1)[0] + "/" + db
    tx_fast = proxy_factory("transaction", upstream=upstream)
    config: Path = tmp_path_factory.mktemp("tx-slow") / "config.toml"
    config.write_text(TEST_CONFIG.read_text().replace("[planner]\n", "[planner]\nfast_path = false\n"))
    tx_slow = proxy_factory("transaction", upstream=upstream, config=config)
    yield db, tx_fast, tx_slow
    tx_slow.stop()
    tx_fast.stop()


def _simple_session(proxy: ProxyProcess, db: str) -> list[Any]:
    """The same simple Query messages again and again (the second and later are answered from
    the kept statement, LocalStatements.answered_again): alone, in a block before and after a
    failing statement (25P02 until ROLLBACK), after statement_timeout changes, and with a
    plain statement's reply owed before them in the same read."""
    predict = f"SELECT pgml.predict('{P}', {SETOSA})".encode()
    out: list[Any] = []
    with psycopg.connect(proxy.dsn(database=db), autocommit=True) as conn:
        pgconn = conn.pgconn

        def run(sql: bytes) -> None:
            out.append(_outcome(pgconn, pgconn.exec_(sql)))

        for sql in (predict, predict, predict, b"BEGIN", predict, predict, b"SELECT 1/0", predict, predict,
                    b"ROLLBACK", predict, b"SET statement_timeout = '10s'", predict, predict,
                    b"RESET statement_timeout", predict, b"SELECT 1; " + predict, predict):
            run(sql)
    return out


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("protocol", ["simple", "prepared"])
def test_repeated_statements_same_with_and_without_fast_path(
    proxies: tuple[str, ProxyProcess, ProxyProcess], tx_proxies: tuple[str, ProxyProcess, ProxyProcess],
    mode: str, protocol: str,
) -> None:
    db, fast, slow = proxies if mode == "session" else tx_proxies
    session = _simple_session if protocol == "simple" else _libpq_again
    got = session(fast, db)
    assert got == session(slow, db)
    codes = [r[1] for r in got if isinstance(r, tuple)]
    if protocol == "simple":
        assert b"25P02" in codes and b"22012" in codes
    else:
        assert codes.count(b"22023") == 4 and b"26000" in codes and b"25P02" in codes, got
    assert sum(r[3] == [b"0.0"] for r in got if isinstance(r, tuple)) >= 10, got  # setosa, class 0


def test_prepared_batches_same_with_and_without_fast_path_in_transaction_pooling(
    tx_proxies: tuple[str, ProxyProcess, ProxyProcess],
) -> None:
    """libpq's prepared Bind/Describe/Execute/Sync (answered as one batch: Frontend
    ._answered_batch) and psycopg's blocks around a failing statement, under transaction
    pooling as under session pooling."""
    db, fast, slow = tx_proxies
    got = _libpq_prepared(fast, db)
    assert got == _libpq_prepared(slow, db)
    assert any(r[1] == b"22023" for r in got if isinstance(r, tuple))
    got = _block(fast, db)
    assert got == _block(slow, db)
    assert ("error", "22023") in got and ("error", "25P02") in got


async def _many_clients(proxy: ProxyProcess, db: str, rounds: int) -> dict[int, list[Any]]:
    """Twelve clients at once, each sending its own simple Query again and again (answered
    together, one loop turn at a time: localexec.NowBatch): distinct features per client, a
    client whose array is the wrong length (22023), one naming no project (42704) and one
    whose statement has two calls; every answer must be that client's own."""
    import asyncio

    features = [[4.4 + 0.3 * i, 2.9 + 0.1 * (i % 3), 1.2 + 0.45 * i, 0.1 + 0.2 * i] for i in range(9)]
    sqls = [f"SELECT pgml.predict('{P}', ARRAY{f})" for f in features]
    sqls += [
        f"SELECT pgml.predict('{P}', ARRAY[1.0, 2.0])",
        f"SELECT pgml.predict('no such project', {SETOSA})",
        f"SELECT pgml.predict('{P}', {SETOSA}) AS a, pgml.predict_proba('{P}', ARRAY{features[8]}) AS b",
    ]

    async def client(i: int) -> list[Any]:
        out: list[Any] = []
        async with await psycopg.AsyncConnection.connect(
            proxy.dsn(database=db), autocommit=True, cursor_factory=psycopg.AsyncClientCursor
        ) as conn:
            for _ in range(rounds):
                try:
                    cur = await conn.execute(sqls[i])
                    out.append(await cur.fetchall())
                except psycopg.Error as exc:
                    out.append(exc.sqlstate)
        return out

    async def prepared(i: int) -> list[Any]:
        """The same through prepared statements (Bind/Execute/Sync batches: answered_batch),
        the project and the features as parameters, some of them in binary."""
        out: list[Any] = []
        project, feats = (
            (P, features[i]) if i < 9 else (P, [1.0, 2.0]) if i == 9 else ("no such project", features[0])
        )
        async with await psycopg.AsyncConnection.connect(proxy.dsn(database=db), autocommit=True) as conn:
            cur = conn.cursor(binary=i % 2 == 0)
            for _ in range(rounds):
                try:
                    await cur.execute("SELECT pgml.predict(%s, %s::real[])", (project, feats), prepare=True)
                    out.append(await cur.fetchall())
                except psycopg.Error as exc:
                    out.append(exc.sqlstate)
        return out

    n = len(sqls)
    results = await asyncio.gather(*(client(i) for i in range(n)), *(prepared(i) for i in range(n - 1)))
    return dict(enumerate(results))


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_many_clients_answered_together_get_their_own_answers(
    proxies: tuple[str, ProxyProcess, ProxyProcess], tx_proxies: tuple[str, ProxyProcess, ProxyProcess],
    mode: str,
) -> None:
    db, fast, slow = proxies if mode == "session" else tx_proxies
    want = await _many_clients(slow, db, 2)
    got = await _many_clients(fast, db, 25)
    for i, answers in got.items():
        assert answers == [want[i][0]] * len(answers), (i, answers[:3], want[i])
    assert len({str(a[0]) for a in got.values()}) >= 3  # distinct features, distinct answers
    assert got[9][0] == "22023" and got[10][0] == "42704"
    assert got[12 + 9][0] == "22023" and got[12 + 10][0] == "42704"
    assert [r[0][0] for r in got[12][:1]] == [r[0][0] for r in got[0][:1]]  # the same features, both ways
