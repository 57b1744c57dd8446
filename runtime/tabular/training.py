"""Fitting and scoring one model: the split, hyperparameter search and the metrics per task.

Pure computation on NumPy arrays, run in a fit process (runtime.tabular.fit_worker); no
database and no event loop here. `progress` lines become INFO notices. Nothing here checks
for a stop: most libraries offer no hook to check it (scikit-learn's forests, SVMs and
searches), so a stopped statement kills the whole process instead (runtime.tabular.fitproc).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InvalidParameterValue
from runtime import optional

from . import algorithms


@dataclass
class TrainJob:
    task: str
    algorithm: str
    hyperparams: dict[str, Any]
    search: str | None
    search_params: dict[str, Any]
    search_args: dict[str, Any]
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None


@dataclass
class TrainResult:
    estimator: Any
    metrics: dict[str, Any]
    hyperparams: dict[str, Any]


def split(
    n: int, y: np.ndarray | None, test_size: float, sampling: str, stratify: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices; `test_size` > 1 is a row count, else a fraction."""
    n_test = int(test_size) if test_size > 1 else round(n * test_size)
    n_test = min(max(n_test, 1 if n > 1 and test_size > 0 else 0), n - 1)
    idx = np.arange(n)
    if sampling == "last":
        return idx[: n - n_test], idx[n - n_test :]
    if sampling == "stratified" and stratify and y is not None and n_test > 0:
        from sklearn.model_selection import train_test_split

        try:
            tr, te = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
            return np.sort(tr), np.sort(te)
        except ValueError:
            pass  # a class with a single row cannot be stratified: fall back to random
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - n_test]), np.sort(perm[n - n_test :])


def _search(
    job: TrainJob, make: Callable[..., Any], progress: Callable[[str], None]
) -> tuple[Any, dict[str, Any]]:
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV

    scoring = {"classification": "f1_macro", "regression": "r2"}.get(job.task)
    cv = int(job.search_args.get("cv", 2))
    base = make(**job.hyperparams)
    grid = {k: v if isinstance(v, list) else [v] for k, v in job.search_params.items()}
    if job.search == "grid":
        searcher: Any = GridSearchCV(base, grid, cv=cv, scoring=scoring, refit=True)
    else:
        searcher = RandomizedSearchCV(
            base,
            grid,
            n_iter=int(job.search_args.get("n_iter", 10)),
            cv=cv,
            scoring=scoring,
            refit=True,
            random_state=0,
        )
    progress(f"{job.search} search over {grid} with {cv}-fold cross-validation")
    searcher.fit(job.x_train, job.y_train)
    res = searcher.cv_results_
    results = {
        "params": [dict(p) for p in res["params"]],
        "mean_test_score": [float(v) for v in res["mean_test_score"]],
        "std_test_score": [float(v) for v in res["std_test_score"]],
        "rank_test_score": [int(v) for v in res["rank_test_score"]],
        "best_params": dict(searcher.best_params_),
        "best_score": float(searcher.best_score_),
    }
    return searcher.best_estimator_, results


def fit(job: TrainJob, progress: Callable[[str], None]) -> TrainResult:
    """Fit, score on the test rows and return the estimator with its metrics.

    Raises InvalidParameterValue for hyperparameters the estimator refuses.
    """
    make = algorithms.estimator_factory(job.task, job.algorithm)
    start = time.perf_counter()
    hyperparams = dict(job.hyperparams)
    search_results = None
    try:
        if job.search:
            estimator, search_results = _search(job, make, progress)
            hyperparams.update(search_results["best_params"])
        else:
            estimator = make(**hyperparams)
            if job.task == "decomposition" or job.task == "clustering":
                estimator.fit(job.x_train)
            else:
                estimator.fit(job.x_train, job.y_train)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterValue(
            f"{job.algorithm} ({job.task}) refused the hyperparameters {job.hyperparams}: {exc}"
        ) from exc
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    metrics = score(job, estimator)
    metrics["fit_time"] = fit_time
    metrics["score_time"] = time.perf_counter() - start
    if search_results is not None:
        metrics["search_results"] = search_results
    return TrainResult(estimator, metrics, hyperparams)


def importances(estimator: Any, n_features: int) -> list[float] | None:
    """The fitted model's feature importances where the library gives them: tree models'
    `feature_importances_`, linear models' `abs(coef_)` (averaged over classes); else None."""
    try:
        values = getattr(estimator, "feature_importances_", None)
        if values is None and getattr(estimator, "coef_", None) is not None:
            coef = np.abs(np.asarray(estimator.coef_, dtype=float))
            values = coef.mean(axis=0) if coef.ndim == 2 else coef
    except (AttributeError, ValueError, TypeError):  # e.g. xgboost's gblinear has no importances
        return None
    if values is None:
        return None
    flat = np.asarray(values, dtype=float).ravel()
    return [float(v) for v in flat] if len(flat) == n_features else None


def score(job: TrainJob, estimator: Any) -> dict[str, Any]:
    """The reference's metrics for the task, on the test rows (train rows when none)."""
    x, y = (job.x_test, job.y_test) if len(job.x_test) else (job.x_train, job.y_train)
    if job.task == "decomposition":
        return {"cumulative_explained_variance": float(np.sum(estimator.explained_variance_ratio_))}
    if job.task == "clustering":
        from sklearn.metrics import silhouette_score

        labels = estimator.predict(x)
        ok = 1 < len(set(labels.tolist())) < len(x)
        return {"silhouette": float(silhouette_score(x, labels)) if ok else -1.0}
    if job.task == "regression":
        return regression_metrics(np.asarray(y), np.asarray(estimator.predict(x)))
    return classification_metrics(np.asarray(y), estimator, x)


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    from sklearn import metrics as m

    pred = pred.reshape(y.shape)
    return {
        "r2": float(m.r2_score(y, pred)),
        "mean_absolute_error": float(m.mean_absolute_error(y, pred)),
        "mean_squared_error": float(m.mean_squared_error(y, pred)),
    }


def classification_metrics(y: np.ndarray, estimator: Any, x: np.ndarray) -> dict[str, Any]:
    from sklearn import metrics as m

    pred = np.asarray(estimator.predict(x)).ravel().astype(np.int64)
    y = y.astype(np.int64)
    out: dict[str, Any] = {
        "f1": float(m.f1_score(y, pred, average="macro", zero_division=0)),
        "precision": float(m.precision_score(y, pred, average="macro", zero_division=0)),
        "recall": float(m.recall_score(y, pred, average="macro", zero_division=0)),
        "accuracy": float(m.accuracy_score(y, pred)),
        "mcc": float(m.matthews_corrcoef(y, pred)),
    }
    if hasattr(estimator, "predict_proba") and len(np.unique(y)) == 2:
        try:
            proba = np.asarray(estimator.predict_proba(x))
            out["roc_auc"] = float(m.roc_auc_score(y, proba[:, 1]))
            out["log_loss"] = float(m.log_loss(y, proba, labels=[0, 1]))
        except (AttributeError, ValueError, IndexError):
            pass  # e.g. SVC without probability=True raises on predict_proba
    return out


def check_task_algorithm(task: str, algorithm: str, joint: bool = False) -> None:
    """Raise 22023 when `algorithm` does not fit `task` (or the joint form)."""
    if task not in algorithms.TASKS:
        raise InvalidParameterValue(f"unknown task {task!r}", hint=f"tasks: {', '.join(algorithms.TASKS)}")
    names = algorithms.available(task)
    if algorithm in algorithms.known(task):
        optional.require(algorithms.library(task, algorithm), f"algorithm {algorithm!r}")
    if algorithm not in names:
        raise InvalidParameterValue(
            f"algorithm {algorithm!r} does not fit the task {task!r}",
            hint=f"algorithms for {task}: {', '.join(names)}",
        )
    if joint and (task != "regression" or algorithm in ("lightgbm", "catboost")):
        raise InvalidParameterValue(
            f"train_joint needs a multi-output regression algorithm, not {algorithm!r} for {task!r}"
        )


def jsonable(value: Any) -> Any:
    """Metrics and hyperparams with NumPy scalars turned into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
