"""The extension's example flows through TabularRuntime against the real test Postgres.

Each flow trains on a dataset loaded by `pgml.load_dataset`, checks the metric the
issue sets as the bar (read back from `pgml.models`, as tools would) and predicts.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from runtime.tabular import TabularRuntime
from tests.test_tabular_support import Notes, call, tab, tab_dsn, train

__all__ = ["tab", "tab_dsn"]
pytestmark = pytest.mark.slow

MALIGNANT = [
    17.99,
    10.38,
    122.8,
    1001.0,
    0.1184,
    0.2776,
    0.3001,
    0.1471,
    0.2419,
    0.07871,
    1.095,
    0.9053,
    8.589,
    153.4,
    0.006399,
    0.04904,
    0.05373,
    0.01587,
    0.03003,
    0.006193,
    25.38,
    17.33,
    184.6,
    2019.0,
    0.1622,
    0.6656,
    0.7119,
    0.2654,
    0.4601,
    0.1189,
]


async def fetch(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def latest_metrics(dsn: str, project: str) -> dict[str, Any]:
    rows = await fetch(
        dsn,
        "SELECT m.metrics FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
        " WHERE p.name = %s ORDER BY m.id DESC LIMIT 1",
        project,
    )
    metrics: dict[str, Any] = rows[0][0]
    return metrics


async def test_datasets_loaded_with_reference_columns(tab: TabularRuntime, tab_dsn: str) -> None:
    counts = {
        name: (await fetch(tab_dsn, f"SELECT count(*) FROM pgml.{name}"))[0][0]
        for name in ("iris", "breast_cancer", "diabetes", "digits", "linnerud", "wine")
    }
    assert counts == {
        "iris": 150,
        "breast_cancer": 569,
        "diabetes": 442,
        "digits": 1797,
        "linnerud": 20,
        "wine": 178,
    }
    assert (
        len(
            (
                await fetch(
                    tab_dsn,
                    "SELECT sepal_length, sepal_width, petal_length, petal_width, target"
                    " FROM pgml.iris LIMIT 1",
                )
            )[0]
        )
        == 5
    )
    row = (await fetch(tab_dsn, 'SELECT "mean radius", malignant FROM pgml.breast_cancer WHERE malignant'))[0]
    assert row[1] is True and row[0] > 0
    assert (
        await fetch(tab_dsn, "SELECT array_dims(image), pg_typeof(image)::text FROM pgml.digits LIMIT 1")
    ) == [("[1:8][1:8]", "smallint[]")]
    assert (
        len((await fetch(tab_dsn, "SELECT age, sex, bmi, bp, s1, s6, target FROM pgml.diabetes LIMIT 1"))[0])
        == 7
    )
    assert (
        len(
            (
                await fetch(
                    tab_dsn, "SELECT chins, situps, jumps, weight, waist, pulse FROM pgml.linnerud LIMIT 1"
                )
            )[0]
        )
        == 6
    )


async def test_load_bbc_news_with_limit(tab: TabularRuntime, tab_dsn: str) -> None:
    rows = await call(tab, "load_dataset", [{"source": "bbc_news", "limit": 40}])
    assert rows == [[("pgml.bbc_news", 40)]]
    got = await fetch(
        tab_dsn, "SELECT count(*), min(length(text)) > 100, count(DISTINCT category) FROM pgml.bbc_news"
    )
    assert got == [(40, True, 1)]
    async with await psycopg.AsyncConnection.connect(tab_dsn, autocommit=True) as conn:
        await conn.execute("CREATE OR REPLACE VIEW iris_view AS SELECT * FROM pgml.iris")
    rows = await call(tab, "load_dataset", [{"source": "iris", "limit": 10}])
    assert rows == [[("pgml.iris", 10)]]
    assert await fetch(tab_dsn, "SELECT count(*) FROM iris_view") == [(10,)]  # views survive a reload
    await call(tab, "load_dataset", [{"source": "iris"}])  # back to 150 rows for the other flows


async def test_iris_multiclass(tab: TabularRuntime, tab_dsn: str) -> None:
    notes = Notes()
    row = await train(
        tab,
        notes,
        project_name="iris flow",
        task="classification",
        relation_name="pgml.iris",
        y_column_name="target",
    )
    assert row == ("iris flow", "classification", "linear", True)
    assert any("training linear" in line for line in notes.lines)
    metrics = await latest_metrics(tab_dsn, "iris flow")
    assert metrics["accuracy"] >= 0.9 and {"f1", "precision", "recall", "mcc"} <= metrics.keys()
    preds = await call(
        tab,
        "predict",
        [
            {"project_name": "iris flow", "features": [5.1, 3.5, 1.4, 0.2]},
            {"project_name": "iris flow", "features": [6.7, 3.0, 5.2, 2.3]},
        ],
    )
    assert preds == [0.0, 2.0]
    proba = await call(
        tab, "predict_proba", [{"project_name": "iris flow", "features": [5.1, 3.5, 1.4, 0.2]}]
    )
    assert len(proba[0]) == 3 and abs(sum(proba[0]) - 1) < 1e-5 and proba[0][0] > 0.8
    # The row form (a record with the table's columns) gives the same answer.
    row_pred = await call(
        tab,
        "predict",
        [
            {
                "project_name": "iris flow",
                "row": {
                    "sepal_length": 6.7,
                    "sepal_width": 3.0,
                    "petal_length": 5.2,
                    "petal_width": 2.3,
                    "target": None,
                },
            }
        ],
    )
    assert row_pred == [2.0]


@pytest.mark.parametrize(
    ("algorithm", "hyperparams"),
    [
        ("xgboost", {"n_estimators": 20, "max_depth": 3}),
        ("lightgbm", {"n_estimators": 20}),
        ("catboost", {"iterations": 30, "depth": 4}),
        ("random_forest", {"n_estimators": 20}),
    ],
)
async def test_breast_cancer_binary(
    tab: TabularRuntime, tab_dsn: str, algorithm: str, hyperparams: dict[str, Any]
) -> None:
    row = await train(
        tab,
        project_name="breast cancer",
        task="classification",
        algorithm=algorithm,
        relation_name="pgml.breast_cancer",
        y_column_name="malignant",
        hyperparams=hyperparams,
    )
    assert row[:3] == ("breast cancer", "classification", algorithm)
    metrics = await latest_metrics(tab_dsn, "breast cancer")
    assert metrics["f1"] >= 0.9 and 0.9 <= metrics["roc_auc"] <= 1 and metrics["log_loss"] > 0
    [model_id] = (await fetch(tab_dsn, "SELECT max(id) FROM pgml.models"))[0]
    pred = await call(tab, "predict", [{"model_id": model_id, "features": MALIGNANT}])
    assert pred == [1.0]  # True: malignant
    proba = await call(tab, "predict_proba", [{"model_id": model_id, "features": MALIGNANT}])
    assert len(proba[0]) == 2 and proba[0][1] > 0.5


async def test_breast_cancer_grid_search_and_deploy_strategies(tab: TabularRuntime, tab_dsn: str) -> None:
    project = "breast cancer deploys"
    await train(
        tab,
        project_name=project,
        task="classification",
        relation_name="pgml.breast_cancer",
        y_column_name="malignant",
        algorithm="xgboost",
        search="grid",
        search_params={"max_depth": [2, 4], "n_estimators": [10, 20]},
        search_args={"cv": 2},
    )
    metrics = await latest_metrics(tab_dsn, project)
    assert metrics["f1"] >= 0.9
    assert len(metrics["search_results"]["params"]) == 4
    hyper = (await fetch(tab_dsn, "SELECT hyperparams FROM pgml.models ORDER BY id DESC LIMIT 1"))[0][0]
    assert hyper["max_depth"] in (2, 4) and hyper["n_estimators"] in (10, 20)
    # A deliberately weak model: never deployed automatically over a better one.
    row = await train(
        tab,
        project_name=project,
        algorithm="xgboost",
        hyperparams={"n_estimators": 1, "max_depth": 1, "learning_rate": 0.01},
    )
    models = [
        r[0]
        for r in await fetch(
            tab_dsn,
            "SELECT m.id FROM pgml.models m JOIN pgml.projects p"
            " ON p.id = m.project_id WHERE p.name = %s ORDER BY m.id",
            project,
        )
    ]
    best, weak = models

    async def deployed() -> int:
        rows = await fetch(tab_dsn, "SELECT id FROM pgml.deployed_models WHERE name = %s", project)
        return int(rows[0][0])

    assert await deployed() == best and (row[3] is False or weak == best)
    assert await call(tab, "deploy", [{"project_name": project, "strategy": "most_recent"}]) == [
        [(project, "most_recent", "xgboost")]
    ]
    assert await deployed() == weak
    assert await call(tab, "deploy", [{"project_name": project, "strategy": "rollback"}]) == [
        [(project, "rollback", "xgboost")]
    ]
    assert await deployed() == best
    await call(tab, "deploy", [{"model_id": weak}])
    assert await deployed() == weak
    await call(tab, "deploy", [{"project_name": project, "strategy": "best_score", "algorithm": "xgboost"}])
    assert await deployed() == best
    overview = await fetch(
        tab_dsn, "SELECT name, task, algorithm, relation_name FROM pgml.overview WHERE name = %s", project
    )
    assert overview == [(project, "classification", "xgboost", "pgml.breast_cancer")]


async def test_digits_image_classification(tab: TabularRuntime, tab_dsn: str) -> None:
    await train(
        tab,
        project_name="digits",
        task="classification",
        relation_name="pgml.digits",
        y_column_name="target",
        algorithm="xgboost",
        hyperparams={"n_estimators": 15, "max_depth": 4},
    )
    assert (await latest_metrics(tab_dsn, "digits"))["accuracy"] >= 0.85
    images = await fetch(tab_dsn, "SELECT image, target FROM pgml.digits ORDER BY random() LIMIT 20")
    calls = [{"project_name": "digits", "features": [float(v) for r in img for v in r]} for img, _ in images]
    preds = await call(tab, "predict", calls)
    assert sum(p == t for p, (_, t) in zip(preds, images, strict=True)) >= 15
    assert (await fetch(tab_dsn, "SELECT num_features FROM pgml.models ORDER BY id DESC LIMIT 1")) == [(64,)]


async def test_diabetes_regression(tab: TabularRuntime, tab_dsn: str) -> None:
    await train(
        tab, project_name="diabetes", task="regression", relation_name="pgml.diabetes", y_column_name="target"
    )
    metrics = await latest_metrics(tab_dsn, "diabetes")
    assert metrics["r2"] >= 0.3 and metrics["mean_absolute_error"] > 0 and metrics["mean_squared_error"] > 0
    await train(
        tab,
        project_name="diabetes",
        algorithm="ridge",
        hyperparams={"alpha": 0.1},
        test_sampling="last",
        test_size=100,
    )
    sample = await fetch(
        tab_dsn, "SELECT ARRAY[age, sex, bmi, bp, s1, s2, s3, s4, s5, s6], target FROM pgml.diabetes LIMIT 3"
    )
    preds = await call(tab, "predict", [{"project_name": "diabetes", "features": f} for f, _ in sample])
    assert all(25 < p < 350 for p in preds)
    batch = await call(
        tab, "predict_batch", [{"project_name": "diabetes", "features": [v for f, _ in sample for v in f]}]
    )
    assert [v for (v,) in batch[0]] == pytest.approx(preds, rel=1e-5)


async def test_linnerud_joint_regression(tab: TabularRuntime, tab_dsn: str) -> None:
    row = await train(
        tab,
        joint=True,
        project_name="linnerud",
        task="regression",
        relation_name="pgml.linnerud",
        y_column_name=["weight", "waist", "pulse"],
    )
    assert row == ("linnerud", "regression", "linear", True)
    assert "r2" in await latest_metrics(tab_dsn, "linnerud")
    out = await call(tab, "predict_joint", [{"project_name": "linnerud", "features": [5.0, 162.0, 60.0]}])
    assert len(out[0]) == 3 and 100 < out[0][0] < 250


async def test_digits_clustering_and_decomposition(tab: TabularRuntime, tab_dsn: str) -> None:
    # As the extension's docs do: a view of the images alone (every column is a feature).
    async with await psycopg.AsyncConnection.connect(tab_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE OR REPLACE VIEW pgml.digit_vectors AS SELECT image::real[] AS image FROM pgml.digits"
        )
    await train(
        tab,
        project_name="digit clusters",
        task="clustering",
        relation_name="pgml.digit_vectors",
        algorithm="kmeans",
        hyperparams={"n_clusters": 10},
    )
    assert -1 <= (await latest_metrics(tab_dsn, "digit clusters"))["silhouette"] <= 1
    img = [0.0, 0, 5, 13, 9, 1, 0, 0] * 8
    [cluster] = await call(tab, "predict", [{"project_name": "digit clusters", "features": img}])
    assert cluster in {float(i) for i in range(10)}
    # A y column given to an unsupervised task is left out of the features.
    row = await train(
        tab,
        project_name="digit components",
        task="decomposition",
        relation_name="pgml.digits",
        y_column_name="target",
        hyperparams={"n_components": 3},
    )
    assert row == ("digit components", "decomposition", "pca", True)
    assert 0 < (await latest_metrics(tab_dsn, "digit components"))["cumulative_explained_variance"] < 1
    [vec] = await call(tab, "decompose", [{"project_name": "digit components", "features": img}])
    assert len(vec) == 3


async def test_snapshot_materialize_and_random_search(tab: TabularRuntime, tab_dsn: str) -> None:
    rows = await call(
        tab,
        "snapshot",
        [
            {
                "relation_name": "pgml.wine",
                "y_column_name": "target",
                "test_size": 0.2,
                "test_sampling": "random",
                "preprocess": {},
            }
        ],
    )
    assert rows == [[("pgml.wine", "target")]]
    snap = await fetch(
        tab_dsn,
        "SELECT relation_name, y_column_name, test_size, test_sampling, status,"
        " jsonb_array_length(columns) FROM pgml.snapshots ORDER BY id DESC LIMIT 1",
    )
    assert snap == [("pgml.wine", ["target"], pytest.approx(0.2), "random", "successful", 14)]
    await train(
        tab,
        project_name="wine",
        task="classification",
        relation_name="pgml.wine",
        y_column_name="target",
        algorithm="random_forest",
        materialize_snapshot=True,
        search="random",
        search_params={"n_estimators": [5, 10, 20], "max_depth": [2, 4, 8]},
        search_args={"n_iter": 3, "cv": 2},
    )
    metrics = await latest_metrics(tab_dsn, "wine")
    assert len(metrics["search_results"]["params"]) == 3 and metrics["f1"] >= 0.8
    [(snap_id, materialized)] = await fetch(
        tab_dsn,
        "SELECT s.id, s.materialized FROM pgml.snapshots s JOIN pgml.models m ON m.snapshot_id = s.id"
        " ORDER BY m.id DESC LIMIT 1",
    )
    assert materialized is True
    assert await fetch(tab_dsn, f"SELECT count(*) FROM pgml.snapshot_{snap_id}") == [(178,)]
    # Retraining without a relation reads the materialized snapshot.
    row = await train(tab, project_name="wine", algorithm="extra_trees", hyperparams={"n_estimators": 10})
    assert row[:3] == ("wine", "classification", "extra_trees")
    assert await fetch(
        tab_dsn,
        "SELECT s.relation_name FROM pgml.snapshots s JOIN pgml.models m"
        " ON m.snapshot_id = s.id ORDER BY m.id DESC LIMIT 1",
    ) == [(f"pgml.snapshot_{snap_id}",)]


async def test_feature_array_types(tab: TabularRuntime) -> None:
    """int, bool and NULL elements arrive as Python values; all become the model's floats."""
    await train(
        tab,
        project_name="iris types",
        task="classification",
        relation_name="pgml.iris",
        y_column_name="target",
        algorithm="xgboost",
        hyperparams={"n_estimators": 10},
    )
    out = await call(
        tab,
        "predict",
        [
            {"project_name": "iris types", "features": [5, 3, 1, 0]},
            {"project_name": "iris types", "features": [True, False, True, False]},
            {"project_name": "iris types", "features": [6.7, None, 5.2, 2.3]},
        ],
    )
    assert out[0] == 0.0 and out[2] == 2.0 and out[1] in (0.0, 1.0, 2.0)
