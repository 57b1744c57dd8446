"""`pgml.train`, `train_joint` and `snapshot`: from arguments to a registered, maybe deployed model.

Validates everything that can be validated before any work (project, task, algorithm,
relation, columns, labels), reads the relation on the runtime's own connection (so it
sees committed data only), fits in a worker process (runtime.tabular.fitproc: a stopped
statement kills it) while relaying progress as INFO notices, and writes project, snapshot,
model, files and deployment in ONE transaction, only once the fit has come back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InvalidParameterValue, NullValueNotAllowed, UndefinedModel
from core.interfaces import CallContext

from . import algorithms, fitproc, preprocess, registry, storage, training

log = logging.getLogger(__name__)

SAMPLINGS = ("stratified", "random", "last")
_DEFAULT_STEPS = {"encode": "native", "impute": "error", "scale": "preserve"}


@dataclass
class TrainingData:
    """A relation read and preprocessed: what a snapshot records and a training consumes."""

    relation: str
    y_names: list[str]
    specs: list[dict[str, Any]]  # every column, labels included, in relation order
    x: np.ndarray
    y: np.ndarray | None
    train_idx: np.ndarray
    test_idx: np.ndarray
    test_size: float
    sampling: str


def _test_size(call: Mapping[str, Any]) -> float:
    """The test share (<= 1) or row count (> 1); NULL means the default 0.25."""
    value = call.get("test_size")
    size = 0.25 if value is None else float(value)
    if size < 0:
        raise InvalidParameterValue(f"test_size must be >= 0, got {size}")
    return size


def _y_names(y: Any) -> list[str]:
    if y is None:
        return []
    return [str(v) for v in y] if isinstance(y, (list, tuple)) else [str(y)]


def _labels(task: str, specs: list[dict[str, Any]], data: Mapping[str, Any]) -> np.ndarray | None:
    """The label array (class indices for classification); 22004 when a label is NULL."""
    labels = registry.label_specs(specs)
    if not labels:
        return None
    cols = []
    for spec in labels:
        values = data[spec["name"]]
        nulls = [v is None for v in values] if spec["kind"] == "text" else np.isnan(values.astype(float))
        if np.any(nulls):
            raise NullValueNotAllowed(
                f"label column {spec['name']!r} has {int(np.sum(nulls))} NULL values",
                hint="filter them out with a view, labels cannot be imputed",
            )
        if task == "classification":
            classes, idx = np.unique(
                values if spec["kind"] != "text" else values.astype(str), return_inverse=True
            )
            spec["statistics"] = {"classes": [c.item() if isinstance(c, np.generic) else c for c in classes]}
            cols.append(idx.astype(np.float64))
        else:
            spec["statistics"] = {}
            cols.append(np.asarray(values, dtype=np.float64))
    return cols[0] if len(cols) == 1 else np.column_stack(cols)


async def prepare(
    pool: registry.Pool,
    task: str,
    relation: str,
    y_names: list[str],
    test_size: float,
    sampling: str,
    steps: Mapping[str, Any],
    *,
    user: str,
    source: str | None = None,
) -> TrainingData:
    """Read `relation`, check the labels, split, fit the preprocessing and build the matrix.

    `user` (the client's role) must be allowed to read `source`, the relation the data came
    from (`relation` itself unless that is a materialized snapshot's copy).
    """
    if sampling not in SAMPLINGS:
        raise InvalidParameterValue(f"test_sampling {sampling!r} is unknown", hint=f"accepted: {SAMPLINGS}")
    async with pool.connection() as conn:
        columns = await registry.relation_columns(conn, relation)
        await registry.check_can_read(conn, source or relation, user)
        names = [n for n, _ in columns]
        for y_name in y_names:
            if y_name not in names:
                raise InvalidParameterValue(
                    f"column {y_name!r} is not in relation {relation!r}", hint=f"columns: {', '.join(names)}"
                )
        preprocess.validate(steps, names)
        data, n = await registry.read_columns(conn, relation, registry.kinds(columns))
    if n < 2:
        raise InvalidParameterValue(f"relation {relation!r} has {n} rows; training needs at least 2")
    specs = [
        {
            "name": name,
            "pg_type": t,
            "kind": preprocess.kind_of(t),
            "position": i + 1,
            "label": name in y_names,
            "array": preprocess.kind_of(t) == "array",
            "size": int(data[name].shape[1]) if preprocess.kind_of(t) == "array" else 1,
            "preprocessor": {**_DEFAULT_STEPS, **steps.get(name, {})},
        }
        for i, (name, t) in enumerate(columns)
    ]
    y = _labels(task, specs, data)
    # A fixed seed: the same relation gives the same split in every proxy and every retrain,
    # so models of one project are compared on the same test rows.
    train_idx, test_idx = training.split(n, y, test_size, sampling, task == "classification", seed=0)
    features = registry.feature_specs(specs)
    for spec in features:
        preprocess.fit(spec, data[spec["name"]][train_idx], None if y is None else y[train_idx])
    x = preprocess.transform(features, data, n)
    return TrainingData(relation, y_names, specs, x, y, train_idx, test_idx, test_size, sampling)


def _arguments(call: Mapping[str, Any], task: str) -> tuple[str, dict[str, Any], str | None]:
    algorithm = call.get("algorithm") or "linear"
    if algorithm == "linear" and task in ("clustering", "decomposition"):
        algorithm = algorithms.DEFAULT_ALGORITHM[task]
    search = call.get("search")
    if search not in (None, "grid", "random"):
        raise InvalidParameterValue(f"search {search!r} is unknown", hint="accepted: grid, random")
    hyperparams = dict(call.get("hyperparams") or {})
    return str(algorithm), hyperparams, search


def _source(
    call: Mapping[str, Any], name: str, snap: Mapping[str, Any] | None
) -> tuple[str, str, list[str], dict[str, Any], float, str]:
    """(relation, source, y columns, preprocess, test_size, test_sampling): the call's, or with
    a NULL relation the project's last snapshot's (its materialized copy when there is one;
    `source` is then the relation it was copied from, whose privileges still apply)."""
    if call.get("relation_name") is not None:
        return (
            str(call["relation_name"]),
            str(call["relation_name"]),
            _y_names(call.get("y_column_name")),
            dict(call.get("preprocess") or {}),
            _test_size(call),
            str(call.get("test_sampling") or "stratified"),
        )
    if snap is None:
        raise InvalidParameterValue(f"relation_name is required: project {name!r} has no snapshot yet")
    relation = f"pgml.snapshot_{snap['id']}" if snap["materialized"] else str(snap["relation_name"])
    steps = {c["name"]: c["preprocessor"] for c in snap["columns"] if not c.get("label")}
    return (
        relation,
        str(snap["relation_name"]),
        list(snap["y_column_name"] or []),
        steps,
        float(snap["test_size"]),
        str(snap["test_sampling"]),
    )


def _job(
    prep: TrainingData,
    task: str,
    algorithm: str,
    hyperparams: dict[str, Any],
    search: str | None,
    call: Mapping[str, Any],
) -> training.TrainJob:
    y = prep.y
    return training.TrainJob(
        task,
        algorithm,
        hyperparams,
        search,
        dict(call.get("search_params") or {}),
        dict(call.get("search_args") or {}),
        prep.x[prep.train_idx],
        None if y is None else y[prep.train_idx],
        prep.x[prep.test_idx],
        None if y is None else y[prep.test_idx],
    )


async def train(
    pool: registry.Pool,
    fits: fitproc.FitWorkers,
    call: Mapping[str, Any],
    ctx: CallContext,
    joint: bool,
    onnx: bool = True,
) -> tuple[Any, ...]:
    """One `pgml.train` call; returns (project, task, algorithm, deployed)."""
    name = str(call["project_name"])
    async with pool.connection() as conn:
        proj = await registry.project(conn, name)
        snap = await registry.last_snapshot(conn, proj["id"]) if proj else None
    task = call.get("task")
    if proj is None and task is None:
        raise UndefinedModel(f"project {name!r} does not exist", hint="pass a task to create it")
    if proj is not None and task is not None and task != proj["task"]:
        raise InvalidParameterValue(f"project {name!r} has task {proj['task']!r}, not {task!r}")
    task = str(task or proj["task"])  # type: ignore[index]
    algorithm, hyperparams, search = _arguments(call, task)
    training.check_task_algorithm(task, algorithm, joint)
    relation, source, y_names, steps, test_size, sampling = _source(call, name, snap)
    if task in ("regression", "classification") and not y_names:
        raise InvalidParameterValue(f"y_column_name is required for {task}")
    prep = await prepare(
        pool, task, relation, y_names, test_size, sampling, steps, user=ctx.user, source=source
    )
    await ctx.notice(
        f"training {algorithm} ({task}) on {len(prep.train_idx)} rows, testing on "
        f"{len(prep.test_idx)}, {prep.x.shape[1]} features"
    )
    job = _job(prep, task, algorithm, hyperparams, search, call)
    labels = registry.label_specs(prep.specs)
    classes = labels[0]["statistics"].get("classes", []) if labels and task == "classification" else []
    fitted = await fits.fit(job, onnx, len(classes), ctx.notice)
    metrics = dict(fitted.metrics)
    await ctx.notice(f"metrics: { {k: v for k, v in metrics.items() if k != 'search_results'} }")
    if fitted.importances is not None:  # shown by the dashboard's model page
        metrics["feature_importances"] = dict(zip(_feature_names(prep), fitted.importances, strict=True))
    await ctx.notice(f"serving: {fitted.serving}")
    log.info("%s model of project %r is served by %s", algorithm, name, fitted.serving)
    deployed = await _register(pool, call, name, task, algorithm, prep, fitted, metrics, ctx.user)
    return (name, task, algorithm, deployed)


def _feature_names(prep: TrainingData) -> list[str]:
    """A name per column of `prep.x`: the column's, with `[i]` for each element of an array."""
    names = [str(spec["name"]) if int(spec.get("size", 1)) == 1 else f"{spec['name']}[{i}]"
             for spec in registry.feature_specs(prep.specs) for i in range(int(spec.get("size", 1)))]
    return names if len(names) == prep.x.shape[1] else [f"feature {i}" for i in range(prep.x.shape[1])]


async def _register(
    pool: registry.Pool,
    call: Mapping[str, Any],
    name: str,
    task: str,
    algorithm: str,
    prep: TrainingData,
    fitted: fitproc.Fitted,
    metrics: dict[str, Any],
    user: str,
) -> bool:
    """Write everything in one transaction; returns whether the new model was deployed."""
    async with pool.connection() as conn, conn.transaction():
        project_id = await registry.ensure_project(conn, name, task, user)
        # A new snapshot row even when the relation is reused: the data and so the fitted
        # preprocessing may have changed since, and row-form predict must use these.
        snapshot_id = await registry.insert_snapshot(
            conn,
            prep.relation,
            prep.y_names,
            prep.test_size,
            prep.sampling,
            prep.specs,
            {"samples": len(prep.x), "features": int(prep.x.shape[1])},
            bool(call.get("materialize_snapshot", False)),
        )
        model_id = await registry.insert_model(
            conn,
            {
                "project_id": project_id,
                "snapshot_id": snapshot_id,
                "num_features": int(prep.x.shape[1]),
                "algorithm": algorithm,
                "hyperparams": fitted.hyperparams,
                "metrics": metrics,
                "search": call.get("search"),
                "search_params": call.get("search_params") or {},
                "search_args": call.get("search_args") or {},
            },
            [(path, i, part) for path, blob in fitted.files for i, part in enumerate(storage.parts(blob))],
        )
        if call.get("automatic_deploy") is False:
            return False
        metric = algorithms.TARGET_METRIC[task]
        current = await registry.deployed_metric(conn, project_id, metric)
        new = metrics.get(metric)
        if current is not None and (new is None or new < current):
            return False
        await registry.deploy(conn, project_id, name, model_id, "new_score")
        return True


async def snapshot(pool: registry.Pool, call: Mapping[str, Any], ctx: CallContext) -> tuple[Any, ...]:
    """`pgml.snapshot`: record the relation's columns, split and preprocessing; (relation, y)."""
    relation = str(call["relation_name"])
    y_names = _y_names(call.get("y_column_name"))
    prep = await prepare(
        pool,
        "regression",
        relation,
        y_names,
        _test_size(call),
        str(call.get("test_sampling") or "stratified"),
        dict(call.get("preprocess") or {}),
        user=ctx.user,
    )
    async with pool.connection() as conn, conn.transaction():
        await registry.insert_snapshot(
            conn,
            relation,
            y_names,
            prep.test_size,
            prep.sampling,
            prep.specs,
            {"samples": len(prep.x), "features": int(prep.x.shape[1])},
            bool(call.get("materialize_snapshot", False)),
        )
    return (relation, ", ".join(y_names))
