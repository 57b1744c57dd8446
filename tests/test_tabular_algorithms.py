"""Every algorithm of the reference whose library is installed trains, is stored safely,
reloads from `pgml.files` and predicts (small data and small hyperparameters)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from runtime.tabular import TabularRuntime, algorithms
from tests.test_tabular_support import call, tab, tab_dsn, train

__all__ = ["tab", "tab_dsn"]
pytestmark = pytest.mark.slow

SMALL = {
    "xgboost": {"n_estimators": 5},
    "xgboost_random_forest": {"n_estimators": 5},
    "lightgbm": {"n_estimators": 5, "min_child_samples": 2},
    "catboost": {"iterations": 5},
    "random_forest": {"n_estimators": 5},
    "extra_trees": {"n_estimators": 5},
    "gradient_boosting_trees": {"n_estimators": 5},
    "ada_boost": {"n_estimators": 5},
    "bagging": {"n_estimators": 3},
    "hist_gradient_boosting": {"max_iter": 5},
    "affinity_propagation": {"random_state": 0},
    "birch": {"n_clusters": 3},
    "kmeans": {"n_clusters": 3},
    "mini_batch_kmeans": {"n_clusters": 3},
}
RELATION = {
    "regression": ("algo_regression", "target"),
    "classification": ("algo_classification", "target"),
    "clustering": ("algo_clustering", None),
}
CASES = [
    (task, name)
    for task in ("regression", "classification", "clustering")
    for name in algorithms.available(task)
]


@pytest.fixture(scope="module")
async def small_tables(tab: TabularRuntime, tab_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(tab_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE OR REPLACE VIEW algo_regression AS SELECT age, bmi, bp, s1, s5, target"
            " FROM pgml.diabetes ORDER BY bmi LIMIT 120"
        )
        await conn.execute("CREATE OR REPLACE VIEW algo_classification AS SELECT * FROM pgml.iris")
        await conn.execute(
            "CREATE OR REPLACE VIEW algo_clustering AS SELECT sepal_length, sepal_width,"
            " petal_length, petal_width FROM pgml.iris"
        )


@pytest.mark.parametrize(("task", "algorithm"), CASES, ids=[f"{t}-{a}" for t, a in CASES])
async def test_every_algorithm(
    tab: TabularRuntime, tab_dsn: str, small_tables: None, task: str, algorithm: str
) -> None:
    relation, y = RELATION[task]
    project = f"algo {task} {algorithm}"
    row = await train(
        tab,
        project_name=project,
        task=task,
        relation_name=relation,
        y_column_name=y,
        algorithm=algorithm,
        hyperparams=SMALL.get(algorithm, {}),
    )
    assert row[:3] == (project, task, algorithm)
    async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
        cur = await conn.execute(
            "SELECT m.id, m.metrics, f.path FROM pgml.models m JOIN pgml.projects p"
            " ON p.id = m.project_id JOIN pgml.files f ON f.model_id = m.id"
            " WHERE p.name = %s",
            (project,),
        )
        found = await cur.fetchall()
    # The native file, and beside it model.onnx where the model converted and checked equal
    # (tests/test_onnx_serving.py covers which do).
    native = [(i, mt, p) for i, mt, p in found if p != "model.onnx"]
    assert len(native) == 1 and len(found) - len(native) <= 1, found
    [(model_id, metrics, path)] = native
    assert algorithms.TARGET_METRIC[task] in metrics
    assert path == {"xgboost": "model.ubj", "lightgbm": "model.txt", "catboost": "model.cbm"}.get(
        algorithms.library(task, algorithm), "model.skops"
    )
    width = {"regression": 5, "classification": 4, "clustering": 4}[task]
    features: list[Any] = (
        [0.03, 0.05, 0.02, -0.01, 0.04][:width] if task == "regression" else [5.1, 3.5, 1.4, 0.2]
    )
    [value] = await call(tab, "predict", [{"model_id": model_id, "features": features}])
    assert isinstance(value, float)
    if task == "classification":
        assert value in (0.0, 1.0, 2.0)
