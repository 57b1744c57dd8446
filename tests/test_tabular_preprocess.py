"""Preprocessing (encode, impute, scale) recorded in the snapshot and applied by row-form predict."""

from __future__ import annotations

import psycopg
import pytest

from core.errors import PgError
from runtime.tabular import TabularRuntime
from tests.test_tabular_support import call, tab, tab_dsn, train

__all__ = ["tab", "tab_dsn"]
pytestmark = pytest.mark.slow

# price depends on the city (text), on size (with NULLs) and on a flag (bool).
HOUSES = """
CREATE TABLE IF NOT EXISTS houses AS
SELECT CASE g % 3 WHEN 0 THEN 'paris' WHEN 1 THEN 'lyon' ELSE 'nice' END AS city,
       CASE WHEN g % 10 = 0 THEN NULL ELSE (20 + g % 50)::real END AS size,
       (g % 2 = 0) AS garden,
       (CASE g % 3 WHEN 0 THEN 300 WHEN 1 THEN 100 ELSE 200 END + 2 * (20 + g % 50)
        + CASE WHEN g % 2 = 0 THEN 40 ELSE 0 END)::real AS price,
       CASE g % 3 WHEN 0 THEN 'paris' WHEN 1 THEN 'lyon' ELSE 'nice' END AS city_label
FROM generate_series(1, 300) g
"""


@pytest.fixture(scope="module")
async def houses(tab_dsn: str) -> str:
    async with await psycopg.AsyncConnection.connect(tab_dsn, autocommit=True) as conn:
        await conn.execute(HOUSES)
        await conn.execute(
            "CREATE OR REPLACE VIEW houses_reg AS SELECT city, size, garden, price FROM houses"
        )
    return "houses_reg"


@pytest.mark.parametrize("encode", ["one_hot", "target", "ordinal", "native"])
async def test_encode_impute_scale_round_trip(
    tab: TabularRuntime, tab_dsn: str, houses: str, encode: str
) -> None:
    project = f"houses {encode}"
    steps = {"city": {"encode": encode}, "size": {"impute": "mean", "scale": "standard"}}
    await train(
        tab,
        project_name=project,
        task="regression",
        relation_name=houses,
        y_column_name="price",
        algorithm="xgboost" if encode in ("ordinal", "native") else "linear",
        hyperparams={"n_estimators": 50} if encode in ("ordinal", "native") else {},
        preprocess=steps,
    )
    async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
        cur = await conn.execute(
            "SELECT s.columns, m.num_features, m.metrics FROM pgml.models m JOIN"
            " pgml.snapshots s ON s.id = m.snapshot_id ORDER BY m.id DESC LIMIT 1"
        )
        columns, num_features, metrics = (await cur.fetchone()) or (None, None, None)
    by_name = {c["name"]: c for c in columns}
    assert by_name["size"]["preprocessor"] == {"encode": "native", "impute": "mean", "scale": "standard"}
    assert by_name["city"]["statistics"]["categories"] == ["lyon", "nice", "paris"]
    assert by_name["price"]["label"] is True
    assert num_features == (5 if encode == "one_hot" else 3)
    assert metrics["r2"] > 0.9
    rows = [
        {"city": "paris", "size": 30.0, "garden": True, "price": None},
        {"city": "lyon", "size": None, "garden": False, "price": None},
    ]
    paris, lyon = await call(tab, "predict", [{"project_name": project, "row": r} for r in rows])
    assert paris == pytest.approx(300 + 60 + 40, abs=25)
    assert 100 < lyon < 260  # size imputed by its mean (about 44)


async def test_text_labels_and_null_features_need_impute(tab: TabularRuntime, houses: str) -> None:
    await train(
        tab,
        project_name="houses city",
        task="classification",
        relation_name="houses",
        y_column_name="city_label",
        algorithm="random_forest",
        hyperparams={"n_estimators": 20},
        preprocess={"size": {"impute": "median"}, "city": {"encode": "one_hot"}},
    )
    [pred] = await call(
        tab,
        "predict",
        [
            {
                "project_name": "houses city",
                "row": {"city": "nice", "size": 30.0, "garden": True, "price": 300.0},
            }
        ],
    )
    assert pred == 1.0  # text labels answer their class index: lyon 0, nice 1, paris 2
    with pytest.raises(PgError) as info:
        await train(
            tab,
            project_name="houses no impute",
            task="regression",
            relation_name="houses_reg",
            y_column_name="price",
        )
    assert (
        info.value.sqlstate == "22004"
        and "'size'" in info.value.message
        and "impute" in (info.value.fields.get("H", ""))
    )
    with pytest.raises(PgError) as info:
        await train(
            tab,
            project_name="houses bad step",
            task="regression",
            relation_name="houses_reg",
            y_column_name="price",
            preprocess={"size": {"scale": "sideways"}},
        )
    assert info.value.sqlstate == "22023" and "sideways" in info.value.message


async def test_anonymous_row_matches_by_position(tab: TabularRuntime, houses: str) -> None:
    """`ROW(...)` reaches the runtime with Postgres's f1, f2, ... keys (to_jsonb of a record)."""
    project = "houses one_hot"
    await train(
        tab,
        project_name=project,
        task="regression",
        relation_name=houses,
        y_column_name="price",
        preprocess={"city": {"encode": "one_hot"}, "size": {"impute": "mean"}},
    )
    named = {"city": "paris", "size": 30.0, "garden": True}
    [by_name] = await call(tab, "predict", [{"project_name": project, "row": named}])
    features_only = {"f1": "paris", "f2": 30.0, "f3": True}
    all_columns = {**features_only, "f4": None}
    assert await call(
        tab,
        "predict",
        [{"project_name": project, "row": features_only}, {"project_name": project, "row": all_columns}],
    ) == [by_name, by_name]
    with pytest.raises(PgError) as info:
        await call(tab, "predict", [{"project_name": project, "row": {"f1": "paris", "f2": 30.0}}])
    assert info.value.sqlstate == "22023" and "2 fields" in info.value.message
