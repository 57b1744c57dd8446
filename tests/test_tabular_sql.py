"""The model-free pgml functions of migration 0002, run natively by the test Postgres."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from sklearn import metrics as skm

from runtime.tabular import TabularRuntime
from tests.test_tabular_support import tab, tab_dsn

__all__ = ["tab", "tab_dsn"]


async def one(dsn: str, query: str, *params: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(query, params)).fetchone()
        assert row is not None
        return row[0]


@pytest.mark.parametrize("t", ["real", "float8"])
async def test_vector_math(tab: TabularRuntime, tab_dsn: str, t: str) -> None:
    a, b = f"ARRAY[1, -2, 3]::{t}[]", f"ARRAY[4, 5, -6]::{t}[]"
    cases = {
        f"pgml.add({a}, 1::{t})": [2, -1, 4],
        f"pgml.add({a}, {b})": [5, 3, -3],
        f"pgml.subtract({a}, {b})": [-3, -7, 9],
        f"pgml.multiply({a}, 2::{t})": [2, -4, 6],
        f"pgml.multiply({a}, {b})": [4, -10, -18],
        f"pgml.divide({a}, 2::{t})": [0.5, -1, 1.5],
        f"pgml.divide({b}, {a})": [4, -2.5, -2],
        f"pgml.norm_l0({a})": 3,
        f"pgml.norm_l1({a})": 6,
        f"pgml.norm_l2({a})": np.sqrt(14),
        f"pgml.norm_max({a})": 3,
        f"pgml.normalize_l1({a})": [1 / 6, -2 / 6, 3 / 6],
        f"pgml.normalize_l2({a})": list(np.array([1, -2, 3]) / np.sqrt(14)),
        f"pgml.normalize_max({a})": [1 / 3, -2 / 3, 1],
        f"pgml.distance_l1({a}, {b})": 19,
        f"pgml.distance_l2({a}, {b})": np.sqrt(9 + 49 + 81),
        f"pgml.dot_product({a}, {b})": -24,
        f"pgml.cosine_similarity({a}, {b})": -24 / (np.sqrt(14) * np.sqrt(77)),
    }
    for expr, expected in cases.items():
        got = await one(tab_dsn, f"SELECT {expr}")
        assert got == pytest.approx(expected, rel=1e-5), expr
    assert await one(tab_dsn, f"SELECT pg_typeof(pgml.add({a}, {b}))::text") == f"{t}[]".replace(
        "float8", "double precision"
    )


async def test_aggregates_and_immutable_in_index(tab: TabularRuntime, tab_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(tab_dsn, autocommit=True) as conn:
        await conn.execute("DROP TABLE IF EXISTS sql_vectors")
        await conn.execute("CREATE TABLE sql_vectors (v real[])")
        await conn.execute("INSERT INTO sql_vectors VALUES ('{1,-5,3}'), ('{-4,2,0}'), (NULL), ('{2,2,-9}')")
        row = await (
            await conn.execute(
                "SELECT pgml.sum(v), pgml.min(v), pgml.max(v), pgml.min_abs(v), pgml.max_abs(v)"
                " FROM sql_vectors"
            )
        ).fetchone()
        assert row == ([-1, -1, -6], [-4, -5, -9], [2, 2, 3], [1, 2, 0], [4, 5, 9])
        # IMMUTABLE: usable in an index expression, and the index answers queries.
        await conn.execute("CREATE INDEX sql_vectors_norm ON sql_vectors (pgml.norm_l2(v))")
        await conn.execute("SET enable_seqscan = off")
        plan = await (
            await conn.execute("EXPLAIN SELECT * FROM sql_vectors WHERE pgml.norm_l2(v) > 5")
        ).fetchall()
        assert any("sql_vectors_norm" in r[0] for r in plan)
        vol = await (
            await conn.execute(
                "SELECT DISTINCT provolatile::text, proisstrict, proparallel::text FROM pg_proc"
                " WHERE pronamespace = 'pgml'::regnamespace AND proname = ANY(%s)",
                (["add", "norm_l2", "cosine_similarity", "sklearn_r2_score"],),
            )
        ).fetchall()
        assert vol == [("i", True, "s")]


async def test_metrics_match_sklearn(tab: TabularRuntime, tab_dsn: str) -> None:
    y = [0, 1, 1, 0, 1, 2, 2, 0, 1, 2]
    p = [0, 1, 0, 0, 1, 2, 1, 0, 1, 1]
    yb, pb = [0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1]
    assert await one(
        tab_dsn, "SELECT pgml.sklearn_f1_score(%s::real[], %s::real[])", yb, pb
    ) == pytest.approx(skm.f1_score(yb, pb), rel=1e-5)
    yr, pr = [3.0, -0.5, 2.0, 7.0], [2.5, 0.0, 2.0, 8.0]
    assert await one(
        tab_dsn, "SELECT pgml.sklearn_r2_score(%s::real[], %s::real[])", yr, pr
    ) == pytest.approx(skm.r2_score(yr, pr), rel=1e-5)
    reg = await one(tab_dsn, "SELECT pgml.sklearn_regression_metrics(%s::real[], %s::real[])", yr, pr)
    assert reg == pytest.approx(
        {
            "r2": skm.r2_score(yr, pr),
            "mean_absolute_error": skm.mean_absolute_error(yr, pr),
            "mean_squared_error": skm.mean_squared_error(yr, pr),
        },
        rel=1e-6,
    )
    cls = await one(tab_dsn, "SELECT pgml.sklearn_classification_metrics(%s::real[], %s::real[], 3)", y, p)
    assert cls == pytest.approx(
        {
            "f1": skm.f1_score(y, p, average="macro"),
            "precision": skm.precision_score(y, p, average="macro"),
            "recall": skm.recall_score(y, p, average="macro"),
            "accuracy": skm.accuracy_score(y, p),
            "mcc": skm.matthews_corrcoef(y, p),
        },
        rel=1e-6,
    )
    assert await one(tab_dsn, "SELECT pgml.version()") == "2.10.0"  # the extension's (migration 0005)


def test_generated_functions_file_is_current() -> None:
    """0005_surface.sql is what gen_functions.py renders (edit the generator, not the SQL)."""
    from runtime.sql import gen_functions

    assert gen_functions.render() == (Path(gen_functions.__file__).parent / "0005_surface.sql").read_text()
