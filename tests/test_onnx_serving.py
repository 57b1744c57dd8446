"""ONNX serving of tabular models (runtime/tabular/compiled.py), through the real proxy.

Differential: one proxy serves with ONNX Runtime, a second one on the same database with
`runtime.tabular.onnx = false` serves the same stored models natively; one-row and batch
`pgml.predict` answer the same (labels exactly, values within 1e-5 relative) on every row of
the relation, the test split among them. An algorithm whose conversion fails is served
natively and still answers. A model stored without its ONNX form is converted at its first
load while the native model answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_postgres import PgServer
from tests.fix_proxy import TEST_CONFIG, ProxyProcess
from tests.test_tabular_support import new_database

pytestmark = pytest.mark.slow

IRIS = "ARRAY[sepal_length, sepal_width, petal_length, petal_width]"
# (project, task, relation, label, algorithm, whether ONNX serves it)
MODELS = [
    ("onnx xgboost", "classification", "pgml.iris", "target", "xgboost", True),
    ("onnx lightgbm", "classification", "pgml.iris", "target", "lightgbm", True),
    ("onnx forest", "classification", "pgml.iris", "target", "random_forest", True),
    ("onnx linear", "classification", "pgml.iris", "target", "linear", True),
    ("onnx svm", "regression", "pgml.diabetes", "target", "svm", True),
    ("onnx catboost", "regression", "pgml.diabetes", "target", "catboost", True),
    ("onnx linreg", "regression", "pgml.diabetes", "target", "linear", True),
    # skl2onnx has no converter for this model's missing-value trees: native, still answering.
    ("onnx hgb", "classification", "pgml.iris", "target", "hist_gradient_boosting", False),
]
HYPER = {
    "xgboost": '{"n_estimators": 20}',
    "lightgbm": '{"n_estimators": 20}',
    "catboost": '{"iterations": 20}',
    "random_forest": '{"n_estimators": 10}',
    "hist_gradient_boosting": '{"max_iter": 10}',
}
Served = tuple[str, "ProxyProcess", "ProxyProcess", dict[str, list[str]]]


def _rows(proxy: ProxyProcess, db: str, sql: str, notes: list[str] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(proxy.dsn(database=db), autocommit=True) as conn:
        if notes is not None:
            conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description is not None else []


def _features(relation: str, db: str, proxy: ProxyProcess) -> str:
    if relation == "pgml.iris":
        return IRIS
    cols = _rows(proxy, db, "SELECT attname FROM pg_attribute WHERE attrelid = 'pgml.diabetes'::regclass"
                 " AND attnum > 0 AND NOT attisdropped AND attname <> 'target' ORDER BY attnum")
    return "ARRAY[" + ", ".join(c for (c,) in cols) + "]"


@pytest.fixture(scope="module")
def served_dsn(pg_server: PgServer) -> list[str]:
    return [new_database(pg_server, "onnx")]


@pytest.fixture(scope="module")
def served(
    served_dsn: list[str],
    proxy_factory: Callable[..., ProxyProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    dsn = served_dsn[0]
    db = dsn.rsplit("/", 1)[1]
    onnx = proxy_factory("session", upstream=dsn)
    config: Path = tmp_path_factory.mktemp("native") / "config.toml"
    native_config = "[runtime]\n\n[runtime.tabular]\nonnx = false\n"
    config.write_text(TEST_CONFIG.read_text().replace("[runtime]\n", native_config))
    native = proxy_factory("session", upstream=dsn, config=config)
    _rows(onnx, db, "SELECT * FROM pgml.load_dataset('iris')")
    _rows(onnx, db, "SELECT * FROM pgml.load_dataset('diabetes')")
    notes: dict[str, list[str]] = {}
    for project, task, relation, label, algorithm, _ in MODELS:
        notes[project] = []
        _rows(onnx, db, f"SELECT * FROM pgml.train('{project}', '{task}', '{relation}', '{label}',"
              f" algorithm => '{algorithm}', hyperparams => '{HYPER.get(algorithm, '{}')}')", notes[project])
    yield db, onnx, native, notes
    native.stop()
    onnx.stop()


def _same(task: str, ours: list[Any], theirs: list[Any]) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        if task == "classification":
            assert a == b
        else:
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6 * max(1.0, abs(b))), (a, b)


@pytest.mark.parametrize("model", MODELS, ids=[m[4] + "-" + m[1] for m in MODELS])
def test_onnx_equals_native(served: Served,
                            model: tuple[str, str, str, str, str, bool]) -> None:
    db, onnx, native, notes = served
    project, task, relation, _, algorithm, converts = model
    serving = [n for n in notes[project] if n.startswith("serving: ")]
    expected = "serving: ONNX Runtime" if converts else "serving: native"
    assert serving and serving[0].startswith(expected), serving
    [(files,)] = _rows(onnx, db, "SELECT array_agg(DISTINCT f.path ORDER BY f.path) FROM pgml.files f"
                       f" JOIN pgml.deployed_models d ON d.id = f.model_id WHERE d.name = '{project}'")
    assert ("model.onnx" in files) is converts, files
    feats = _features(relation, db, onnx)
    batch = f"SELECT pgml.predict('{project}', {feats}) FROM {relation} ORDER BY ctid"
    ours, theirs = _rows(onnx, db, batch), _rows(native, db, batch)
    _same(task, [r[0] for r in ours], [r[0] for r in theirs])
    # One-row statements (the one-row path, batched with nothing else).
    one = [f"SELECT pgml.predict('{project}', {feats}) FROM {relation} ORDER BY ctid LIMIT 1 OFFSET {i}"
           for i in (0, 7, 42)]
    _same(task, [_rows(onnx, db, q)[0][0] for q in one], [_rows(native, db, q)[0][0] for q in one])
    if task == "classification" and algorithm != "svm":
        proba = f"SELECT pgml.predict_proba('{project}', {feats}) FROM {relation} ORDER BY ctid LIMIT 20"
        for (p,), (q,) in zip(_rows(onnx, db, proba), _rows(native, db, proba), strict=True):
            assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(p, q, strict=True))
    [(model_id,)] = _rows(onnx, db, f"SELECT id FROM pgml.deployed_models WHERE name = '{project}'")
    engine = "ONNX Runtime" if converts else "native"
    # A model stored without its ONNX form (hgb) is tried in the background after its first
    # load, and says how it is served once that try ends: wait for the line.
    said = f"model {model_id} ({_lib(algorithm)} {task}) is served by {engine}"
    assert said in onnx.wait_log(said)
    said = f"model {model_id} ({_lib(algorithm)} {task}) is served by native"
    assert said in native.wait_log(said)


def _lib(algorithm: str) -> str:
    return algorithm if algorithm in ("xgboost", "lightgbm", "catboost") else "sklearn"


def test_missing_values_predicted_natively(
    served: Served,
) -> None:
    """A NULL feature (NaN) in a tree model whose ONNX form was not checked on NaN rows answers
    as the native model does."""
    db, onnx, native, _ = served
    for project in ("onnx forest", "onnx xgboost"):
        sql = f"SELECT pgml.predict('{project}', ARRAY[5.1, NULL, 1.4, 0.2]::real[])"
        assert _rows(onnx, db, sql) == _rows(native, db, sql)


def test_older_model_converted_at_first_load(
    served: Served,
    proxy_factory: Callable[..., ProxyProcess],
    served_dsn: list[str],
) -> None:
    db, onnx, native, _ = served
    dsn = served_dsn[0]
    project = "onnx xgboost"
    where = f"model_id = (SELECT id FROM pgml.deployed_models WHERE name = '{project}')"
    _rows(onnx, db, f"DELETE FROM pgml.files WHERE path = 'model.onnx' AND {where}")
    batch = f"SELECT pgml.predict('{project}', {IRIS}) FROM pgml.iris ORDER BY ctid"
    # A proxy that has not loaded the model yet: native answers at once, ONNX after the check.
    second = proxy_factory("session", upstream=dsn)
    try:
        first = _rows(second, db, batch)
        converted = "is served by ONNX Runtime: checked equal"
        assert converted in second.wait_log(converted)
        stored = f"SELECT count(*) FROM pgml.files WHERE path = 'model.onnx' AND {where}"
        assert _rows(second, db, stored) == [(1,)]
        assert _rows(second, db, batch) == first == _rows(native, db, batch)
    finally:
        second.stop()


@pytest.mark.parametrize("project", ["onnx xgboost", "onnx linreg"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_table_predict_equals_one_row_predicts(served: Served, project: str, binary: bool) -> None:
    """`SELECT ..., pgml.predict(p, features) FROM t` over 3,000 rows (chunks that grow, read
    column-wise: core/datarows.py) answers what one-row statements answer, row for row, with
    pass-through columns of every length beside it, in text and in binary; chunks holding a
    NULL array, a NULL element or NaN take the row-by-row path and still agree."""
    db, onnx, _, _ = served
    relation = "pgml.iris" if project == "onnx xgboost" else "pgml.diabetes"
    feats = _features(relation, db, onnx)
    table = "predict_" + project.split()[1]
    _rows(onnx, db, f"DROP TABLE IF EXISTS {table}")
    _rows(onnx, db, f"CREATE TABLE {table} AS SELECT row_number() OVER () AS id,"
          f" repeat('x', (row_number() OVER ())::int % 7) AS tag, {feats}::real[] AS f"
          f" FROM {relation}, generate_series(1, 3000 / (SELECT count(*) FROM {relation}) + 1)")
    _rows(onnx, db, f"UPDATE {table} SET f = NULL WHERE id = 2500")
    _rows(onnx, db, f"UPDATE {table} SET f[1] = NULL WHERE id = 2600")
    _rows(onnx, db, f"UPDATE {table} SET f[2] = 'NaN' WHERE id = 2700")
    sql = f"SELECT id, tag, pgml.predict('{project}', f), length(tag) FROM {table} ORDER BY id"
    one = f"SELECT pgml.predict(%s, f) FROM {table} WHERE id = %s"
    task = "classification" if project == "onnx xgboost" else "regression"
    with psycopg.connect(onnx.dsn(database=db), autocommit=True) as conn:
        if task == "regression":  # a linear model refuses a NULL element, both ways alike
            with pytest.raises(psycopg.errors.NullValueNotAllowed):
                conn.execute(one, (project, 2600))
            with pytest.raises(psycopg.errors.NullValueNotAllowed):
                conn.cursor(binary=binary).execute(sql)
            _rows(onnx, db, f"UPDATE {table} SET f = NULL WHERE id IN (2600, 2700)")
        rows = conn.cursor(binary=binary).execute(sql).fetchall()
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 3000
        assert all(r[1] == "x" * (r[0] % 7) and r[3] == r[0] % 7 for r in rows)
        assert rows[2499][2] is None  # a NULL features array: NULL, as STRICT says
        for i in [*range(1, len(rows) + 1, 97), 2600, 2700, len(rows)]:
            (expected,) = conn.execute(one, (project, i)).fetchone() or (None,)
            if expected is None:
                assert rows[i - 1][2] is None
            else:
                _same(task, [rows[i - 1][2]], [expected])
