"""Acceptance: pgml statements in every position through the real proxy, real runtime, real Postgres.

The proxy runs as users run it (`python -m proxy.main`, tests/config.test.toml) with the
real all-MiniLM-L6-v2 and the tabular runtime; each statement goes through psycopg
(text and binary) and asyncpg, and its rows are compared with a reference computed
by calling `runtime.Runtime` directly in this process on the same data.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

import asyncpg
import numpy as np
import psycopg
import pytest

from core.interfaces import CallContext
from tests.fix_proxy import ProxyProcess, start_proxy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
M = "all-MiniLM-L6-v2"
TEXTS = [
    "the cat sat on the mat",
    "a dog barks at night",
    "stock markets fell sharply",
    "the central bank raised rates",
    "a recipe for bread",
    "how to bake sourdough",
    "the telescope saw a galaxy",
    "stars form in nebulae",
]
ROWS = list(enumerate(TEXTS, start=1))
FEATS = "ARRAY[sepal_length, sepal_width, petal_length, petal_width]"


class Ref:
    """Reference values computed by the runtime itself, in this process."""

    vec: dict[str, np.ndarray]
    pred: dict[int, float]
    feats: dict[int, list[float]]


@pytest.fixture(scope="module")
def acc_proxy(pg_dsn: str) -> Iterator[ProxyProcess]:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS acc_docs, acc_iris, acc_out")
        c.execute("CREATE TABLE acc_docs (id int PRIMARY KEY, body text, embedding vector(384))")
        c.cursor().executemany("INSERT INTO acc_docs (id, body) VALUES (%s, %s)", ROWS)
    proxy = start_proxy(pg_dsn, "session")
    with psycopg.connect(proxy.dsn(), autocommit=True) as c:
        c.execute("SELECT * FROM pgml.load_dataset('iris')")
        c.execute("CREATE TABLE acc_iris AS SELECT row_number() OVER () AS id, * FROM pgml.iris")
        c.execute("SELECT * FROM pgml.train('acc_iris', 'classification', 'pgml.iris', 'target')")
        c.execute("UPDATE acc_docs SET embedding = pgml.embed(%s, body)::vector", (M,))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
async def ref(acc_proxy: ProxyProcess, pg_dsn: str) -> AsyncIterator[Ref]:
    import runtime

    rt = runtime.Runtime({}, pg_dsn)
    await rt.start()

    async def note(_: str) -> None:
        return None

    ctx = CallContext(notice=note)
    out = Ref()
    texts = [*TEXTS, "bread", "space", "money"]
    vecs = await rt.call_batch("embed", [{"transformer": M, "text": t, "kwargs": {}} for t in texts], ctx)
    out.vec = {t: np.asarray(v, dtype=np.float32) for t, v in zip(texts, vecs, strict=True)}
    with psycopg.connect(pg_dsn) as c:
        rows = c.execute(f"SELECT id, {FEATS} FROM acc_iris ORDER BY id").fetchall()
    out.feats = {int(i): [float(x) for x in f] for i, f in rows}
    preds = await rt.call_batch(
        "predict", [{"project_name": "acc_iris", "features": f} for f in out.feats.values()], ctx
    )
    out.pred = {i: float(p) for i, p in zip(out.feats, preds, strict=True)}
    yield out
    await rt.close()


def near(text: str, r: Ref) -> list[int]:
    """Document ids by cosine distance to `text`'s embedding (what `<=>` orders by)."""
    q = r.vec[text]
    dist = {
        i: 1 - float(np.dot(r.vec[t], q) / (np.linalg.norm(r.vec[t]) * np.linalg.norm(q))) for i, t in ROWS
    }
    return sorted(dist, key=lambda i: (dist[i], i))


def _nearest(q: str, k: int, r: Ref) -> list[tuple[Any, ...]]:
    return [(i,) for i in near(q, r)[:k]]


def _preds_from(lo: int, r: Ref) -> list[tuple[Any, ...]]:
    return [(i, r.pred[i]) for i in range(lo, min(lo + 3, 151))]


def _positive(lo: int, r: Ref) -> list[tuple[Any, ...]]:
    return [(i,) for i in range(lo, min(lo + 6, 151)) if r.pred[i] > 0]


def _pred_of(lo: int, r: Ref) -> list[tuple[Any, ...]]:
    return [(r.pred[lo],)]


def _doc(text: str, r: Ref) -> list[tuple[Any, ...]]:
    return [(text, r.vec[text])]


Case = tuple[str, tuple[Any, ...], Callable[[Ref], list[tuple[Any, ...]]]]
CASES: list[Case] = [
    (f"SELECT pgml.embed('{M}', 'bread')", (), lambda r: [(r.vec["bread"],)]),
    (f"SELECT pgml.embed(transformer => '{M}', text => 'space')", (), lambda r: [(r.vec["space"],)]),
    (f"SELECT pgml.embed('{M}', %s)", ("money",), lambda r: [(r.vec["money"],)]),
    (
        f"SELECT pgml.embed('{M}', 'bread') AS a, pgml.embed('{M}', 'space') AS b",
        (),
        lambda r: [(r.vec["bread"], r.vec["space"])],
    ),
    (
        f"SELECT * FROM pgml.embed('{M}', ARRAY['bread', 'space'])",
        (),
        lambda r: [(r.vec["bread"],), (r.vec["space"],)],
    ),
    (
        f"SELECT id, pgml.embed('{M}', body) FROM acc_docs ORDER BY id",
        (),
        lambda r: [(i, r.vec[t]) for i, t in ROWS],
    ),
    (
        f"SELECT pgml.embed('{M}', body), id FROM acc_docs WHERE id > %s ORDER BY id",
        (4,),
        lambda r: [(r.vec[t], i) for i, t in ROWS if i > 4],
    ),
    (
        f"SELECT id, pgml.embed('{M}', body) AS e FROM acc_docs ORDER BY id DESC LIMIT 3",
        (),
        lambda r: [(i, r.vec[t]) for i, t in reversed(ROWS)][:3],
    ),
    (
        f"SELECT id FROM acc_docs WHERE (pgml.embed('{M}', body))[1] > 0 ORDER BY id",
        (),
        lambda r: [(i,) for i, t in ROWS if r.vec[t][0] > 0],
    ),
    (
        f"SELECT id FROM acc_docs WHERE pgml.embed('{M}', body) = pgml.embed('{M}', %s) ORDER BY id",
        (TEXTS[2],),
        lambda r: [(3,)],
    ),
    (
        f"WITH e AS (SELECT id, pgml.embed('{M}', body) AS v FROM acc_docs) "
        "SELECT id, v FROM e WHERE id <= 2 "
        "ORDER BY id",
        (),
        lambda r: [(i, r.vec[t]) for i, t in ROWS if i <= 2],
    ),
    (
        f"SELECT s.id, s.v FROM (SELECT id, pgml.embed('{M}', body) AS v FROM acc_docs) s WHERE s.id = 5",
        (),
        lambda r: [(5, r.vec[TEXTS[4]])],
    ),
    (f"SELECT count(*) FROM acc_docs GROUP BY (pgml.embed('{M}', body))[2] > 100", (), lambda r: [(8,)]),
]
for _q in ("bread", "space", "money"):
    CASES += [
        (
            f"SELECT id FROM acc_docs ORDER BY embedding <=> pgml.embed('{M}', '{_q}')::vector LIMIT 3",
            (),
            partial(_nearest, _q, 3),
        ),
        (
            f"SELECT id FROM acc_docs ORDER BY embedding <=> pgml.embed('{M}', %s)::vector, id LIMIT 2",
            (_q,),
            partial(_nearest, _q, 2),
        ),
        (
            f"SELECT id FROM acc_docs ORDER BY pgml.embed('{M}', body)::vector "
            f"<=> pgml.embed('{M}', '{_q}')::vector"
            ", id LIMIT 1",
            (),
            partial(_nearest, _q, 1),
        ),
    ]
CASES += [
    ("SELECT pgml.predict('acc_iris', ARRAY[5.1, 3.5, 1.4, 0.2])", (), lambda r: [(r.pred[1],)]),
    (
        "SELECT pgml.predict(project_name => 'acc_iris', features => %s::real[])",
        ([6.7, 3.0, 5.2, 2.3],),
        lambda r: [(r.pred[146],)],
    ),
    (
        f"SELECT id, pgml.predict('acc_iris', {FEATS}) FROM acc_iris ORDER BY id",
        (),
        lambda r: [(i, p) for i, p in r.pred.items()],
    ),
    (
        f"SELECT count(*) FROM acc_iris WHERE pgml.predict('acc_iris', {FEATS}) = target",
        (),
        lambda r: [(sum(1 for i, p in r.pred.items() if p == [0, 1, 2][(i - 1) // 50]),)],
    ),
    (
        f"SELECT pgml.predict('acc_iris', {FEATS}) AS k, count(*) FROM acc_iris GROUP BY 1 ORDER BY 1",
        (),
        lambda r: sorted((k, sum(1 for p in r.pred.values() if p == k)) for k in set(r.pred.values())),
    ),
    (
        f"SELECT id FROM acc_iris ORDER BY pgml.predict('acc_iris', {FEATS}) DESC, id LIMIT 4",
        (),
        lambda r: [(i,) for i in sorted(r.pred, key=lambda i: (-r.pred[i], i))[:4]],
    ),
    (
        f"WITH p AS (SELECT id, pgml.predict('acc_iris', {FEATS}) AS k FROM acc_iris) "
        "SELECT k, min(id) FROM p GROUP BY k ORDER BY k",
        (),
        lambda r: sorted((k, min(i for i, p in r.pred.items() if p == k)) for k in set(r.pred.values())),
    ),
    (
        "SELECT a.id FROM acc_iris a JOIN acc_iris b ON b.id = a.id + 50 AND "
        "pgml.predict('acc_iris', ARRAY[a.sepal_length, a.sepal_width, a.petal_length, a.petal_width]) "
        "= pgml.predict('acc_iris', ARRAY[b.sepal_length, b.sepal_width, b.petal_length, b.petal_width]) "
        "ORDER BY 1",
        (),
        lambda r: [(i,) for i in range(1, 101) if r.pred[i] == r.pred[i + 50]],
    ),
]
for _lo in (1, 40, 60, 99, 120, 149):
    CASES += [
        (
            f"SELECT id, pgml.predict('acc_iris', {FEATS}) FROM acc_iris WHERE id >= %s ORDER BY id LIMIT 3",
            (_lo,),
            partial(_preds_from, _lo),
        ),
        ("SELECT pgml.predict('acc_iris', %s::float8[])", (None,), lambda r: [(None,)])
        if _lo == 1
        else (f"SELECT pgml.predict('acc_iris', %s::float8[]) AS p{_lo}", (None,), lambda r: [(None,)]),
        (
            f"SELECT id FROM acc_iris WHERE id BETWEEN %s AND %s AND pgml.predict('acc_iris', {FEATS}) > 0 "
            "ORDER BY id",
            (_lo, _lo + 5),
            partial(_positive, _lo),
        ),
        (
            f"SELECT (SELECT pgml.predict('acc_iris', {FEATS}) FROM acc_iris i WHERE i.id = %s)",
            (_lo,),
            partial(_pred_of, _lo),
        ),
    ]
for _i, _t in ROWS:
    CASES.append(
        (
            f"SELECT body, pgml.embed('{M}', body) FROM acc_docs WHERE id = %s",
            (_i,),
            partial(_doc, _t),
        )
    )


def close(got: list[Any], want: list[Any]) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            if isinstance(b, np.ndarray | list) and not isinstance(b, str):
                if a is None or not np.allclose(np.asarray(a, dtype=np.float32), np.asarray(b), atol=2e-3):
                    return False
            elif isinstance(b, float):
                if a is None or abs(float(a) - b) > 1e-4:
                    return False
            elif a != b:
                return False
    return True


def test_sixty_statements() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(("sql", "params", "want"), CASES)
def test_psycopg(
    acc_proxy: ProxyProcess,
    ref: Ref,
    sql: str,
    params: tuple[Any, ...],
    want: Callable[[Ref], list[Any]],
    binary: bool,
) -> None:
    with psycopg.connect(acc_proxy.dsn(), autocommit=True) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(sql, params or None)  # type: ignore[arg-type]
        got = cur.fetchall()
        assert close(got, want(ref)), (got[:3], want(ref)[:3])


@pytest.mark.parametrize(("sql", "params", "want"), CASES)
async def test_asyncpg(
    acc_proxy: ProxyProcess, ref: Ref, sql: str, params: tuple[Any, ...], want: Callable[[Ref], list[Any]]
) -> None:
    conn = await asyncpg.connect(acc_proxy.dsn())
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    try:
        n = iter(range(1, 20))
        text = sql
        while "%s" in text:
            text = text.replace("%s", f"${next(n)}", 1)
        rows = await conn.fetch(text, *params)
        got = [tuple(r.values()) for r in rows]
        assert close(got, want(ref)), (got[:3], want(ref)[:3])
    finally:
        await conn.close()


def test_writes_with_row_dependent_calls(acc_proxy: ProxyProcess, ref: Ref) -> None:
    with psycopg.connect(acc_proxy.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS acc_out")
        conn.execute(
            f"CREATE TABLE acc_out AS SELECT id, pgml.embed('{M}', body) AS e FROM acc_docs WHERE id < 3"
        )
        conn.execute(f"INSERT INTO acc_out SELECT id, pgml.embed('{M}', body) FROM acc_docs WHERE id = 3")
        conn.execute(f"INSERT INTO acc_out VALUES (%s, pgml.embed('{M}', %s))", (99, "money"))
        conn.execute(f"UPDATE acc_out SET e = pgml.embed('{M}', 'space') WHERE id = 2")
        # CREATE TABLE AS made `e` vector(384) (pgvector); read it back as the extension's real[].
        got = conn.execute("SELECT id, e::real[] FROM acc_out ORDER BY id").fetchall()
        assert conn.execute("SELECT pg_typeof(e)::text FROM acc_out LIMIT 1").fetchone() == ("vector",)
        want = [(1, ref.vec[TEXTS[0]]), (2, ref.vec["space"]), (3, ref.vec[TEXTS[2]]), (99, ref.vec["money"])]
        assert close(got, want)
