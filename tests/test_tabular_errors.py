"""Bad input to the tabular functions: the right SQLSTATE, a message naming the problem,
and the registry exactly as it was (nothing half-written)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from core.errors import PgError
from runtime.tabular import TabularRuntime
from tests.test_tabular_support import call, tab, tab_dsn, train

__all__ = ["tab", "tab_dsn"]
pytestmark = pytest.mark.slow

COUNTS = (
    "SELECT (SELECT count(*) FROM pgml.projects), (SELECT count(*) FROM pgml.snapshots),"
    " (SELECT count(*) FROM pgml.models), (SELECT count(*) FROM pgml.files),"
    " (SELECT count(*) FROM pgml.deployments)"
)


async def registry_counts(dsn: str) -> tuple[Any, ...]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(COUNTS)).fetchone()
        assert row is not None
        return tuple(row)


@pytest.fixture(scope="module")
async def errors_project(tab: TabularRuntime) -> str:
    """A trained iris project the error cases can refer to."""
    await train(
        tab,
        project_name="errors iris",
        task="classification",
        relation_name="pgml.iris",
        y_column_name="target",
    )
    return "errors iris"


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown project", {"project_name": "no such project"}, "42704", "no such project"),
    (
        "task mismatch",
        {
            "project_name": "errors iris",
            "task": "regression",
            "relation_name": "pgml.iris",
            "y_column_name": "target",
        },
        "22023",
        "'classification', not 'regression'",
    ),
    (
        "algorithm for task",
        {
            "project_name": "errors new",
            "task": "regression",
            "relation_name": "pgml.iris",
            "y_column_name": "target",
            "algorithm": "kmeans",
        },
        "22023",
        "'kmeans'",
    ),
    (
        "unknown algorithm",
        {
            "project_name": "errors new",
            "task": "classification",
            "relation_name": "pgml.iris",
            "y_column_name": "target",
            "algorithm": "no_such_algo",
        },
        "22023",
        "no_such_algo",
    ),
    (
        "bad hyperparams",
        {
            "project_name": "errors new",
            "task": "classification",
            "relation_name": "pgml.iris",
            "y_column_name": "target",
            "algorithm": "random_forest",
            "hyperparams": {"n_estimators": -3},
        },
        "22023",
        "n_estimators",
    ),
    (
        "unknown hyperparam",
        {
            "project_name": "errors new",
            "task": "classification",
            "relation_name": "pgml.iris",
            "y_column_name": "target",
            "hyperparams": {"bogus_knob": 1},
        },
        "22023",
        "bogus_knob",
    ),
    (
        "unknown relation",
        {
            "project_name": "errors new",
            "task": "classification",
            "relation_name": "pgml.nope",
            "y_column_name": "target",
        },
        "42P01",
        "pgml.nope",
    ),
    (
        "unknown y column",
        {
            "project_name": "errors new",
            "task": "classification",
            "relation_name": "pgml.iris",
            "y_column_name": "nope",
        },
        "22023",
        "'nope'",
    ),
    (
        "NULL labels",
        {
            "project_name": "errors new",
            "task": "regression",
            "relation_name": "errors_nulls",
            "y_column_name": "y",
        },
        "22004",
        "'y'",
    ),
    (
        "bad test_sampling",
        {
            "project_name": "errors new",
            "task": "regression",
            "relation_name": "pgml.iris",
            "y_column_name": "target",
            "test_sampling": "sideways",
        },
        "22023",
        "sideways",
    ),
]


@pytest.mark.parametrize(("case", "args", "sqlstate", "named"), CASES, ids=[c[0] for c in CASES])
async def test_train_errors_leave_registry_unchanged(
    tab: TabularRuntime,
    tab_dsn: str,
    errors_project: str,
    case: str,
    args: dict[str, Any],
    sqlstate: str,
    named: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(tab_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS errors_nulls AS"
            " SELECT g::real AS x, CASE WHEN g % 7 = 0 THEN NULL ELSE g END::real AS y"
            " FROM generate_series(1, 50) g"
        )
    before = await registry_counts(tab_dsn)
    with pytest.raises(PgError) as info:
        await train(tab, **args)
    assert info.value.sqlstate == sqlstate, info.value.message
    assert named in info.value.message
    assert await registry_counts(tab_dsn) == before


async def test_predict_errors(tab: TabularRuntime, errors_project: str) -> None:
    with pytest.raises(PgError) as info:
        await call(tab, "predict", [{"project_name": errors_project, "features": [1.0, 2.0]}])
    assert info.value.sqlstate == "22023" and "2 elements" in info.value.message and "4" in info.value.message
    with pytest.raises(PgError) as info:
        await call(tab, "predict", [{"project_name": "never trained", "features": [1.0]}])
    assert info.value.sqlstate == "42704" and "never trained" in info.value.message
    with pytest.raises(PgError) as info:
        await call(tab, "predict", [{"model_id": 987654, "features": [1.0]}])
    assert info.value.sqlstate == "42704" and "987654" in info.value.message
    with pytest.raises(PgError) as info:
        await call(tab, "predict_joint", [{"project_name": errors_project, "features": [1.0, 2, 3, 4]}])
    assert info.value.sqlstate == "22023" and "classification" in info.value.message
    with pytest.raises(PgError) as info:
        await call(tab, "deploy", [{"project_name": errors_project, "strategy": "sideways"}])
    assert info.value.sqlstate == "22023" and "sideways" in info.value.message
    # The runtime stays usable after every error.
    assert await call(
        tab, "predict", [{"project_name": errors_project, "features": [5.1, 3.5, 1.4, 0.2]}]
    ) == [0.0]


async def test_load_dataset_errors(tab: TabularRuntime) -> None:
    with pytest.raises(PgError) as info:
        await call(tab, "load_dataset", [{"source": "imdb"}])
    # Offline (the suite runs with HF_HUB_OFFLINE=1) and not in the cache: 42704 naming it.
    assert info.value.sqlstate == "42704" and "imdb" in info.value.message
