"""The fast path for statements whose only work is constant pgml calls (planner/handler.py).

Differential: the same statements, simple and extended protocol (psycopg text and binary,
prepared and not; asyncpg, which describes every statement), through a proxy with
`planner.fast_path = true` (the default) and one with it off, on the same model: the same
rows, column names, column types and SQLSTATEs, on the first execution and on repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

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
