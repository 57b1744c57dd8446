"""The algorithm names of `pgml.train` per task, mapped to estimator classes.

Only libraries that are installed are offered; the registry validates names before
any training starts so a bad name is an error of its own (22023) naming what fits.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from runtime import optional

TASKS = ("regression", "classification", "clustering", "decomposition")
# The metric that decides automatic deployment (bigger is better for each).
TARGET_METRIC = {
    "regression": "r2",
    "classification": "f1",
    "clustering": "silhouette",
    "decomposition": "cumulative_explained_variance",
}
DEFAULT_ALGORITHM = {
    "regression": "linear",
    "classification": "linear",
    "clustering": "kmeans",
    "decomposition": "pca",
}

_LM = "sklearn.linear_model"
_E = "sklearn.ensemble"
_REGRESSION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "linear": (_LM, "LinearRegression", {}),
    "lasso": (_LM, "Lasso", {}),
    "svm": ("sklearn.svm", "SVR", {}),
    "elastic_net": (_LM, "ElasticNet", {}),
    "ridge": (_LM, "Ridge", {}),
    "random_forest": (_E, "RandomForestRegressor", {}),
    "xgboost": ("xgboost", "XGBRegressor", {}),
    "xgboost_random_forest": ("xgboost", "XGBRFRegressor", {}),
    "orthogonal_matching_pursuit": (_LM, "OrthogonalMatchingPursuit", {}),
    "bayesian_ridge": (_LM, "BayesianRidge", {}),
    "automatic_relevance_determination": (_LM, "ARDRegression", {}),
    "stochastic_gradient_descent": (_LM, "SGDRegressor", {}),
    "passive_aggressive": (_LM, "PassiveAggressiveRegressor", {}),
    "ransac": (_LM, "RANSACRegressor", {}),
    "theil_sen": (_LM, "TheilSenRegressor", {}),
    "huber": (_LM, "HuberRegressor", {}),
    "quantile": (_LM, "QuantileRegressor", {}),
    "kernel_ridge": ("sklearn.kernel_ridge", "KernelRidge", {}),
    "gaussian_process": ("sklearn.gaussian_process", "GaussianProcessRegressor", {}),
    "nu_svm": ("sklearn.svm", "NuSVR", {}),
    "ada_boost": (_E, "AdaBoostRegressor", {}),
    "bagging": (_E, "BaggingRegressor", {}),
    "extra_trees": (_E, "ExtraTreesRegressor", {}),
    "gradient_boosting_trees": (_E, "GradientBoostingRegressor", {}),
    "hist_gradient_boosting": (_E, "HistGradientBoostingRegressor", {}),
    "least_angle": (_LM, "Lars", {}),
    "lasso_least_angle": (_LM, "LassoLars", {}),
    "linear_svm": ("sklearn.svm", "LinearSVR", {}),
    "lightgbm": ("lightgbm", "LGBMRegressor", {"verbose": -1}),
    "catboost": ("catboost", "CatBoostRegressor", {"verbose": False, "allow_writing_files": False}),
}
_CLASSIFICATION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "linear": (_LM, "LogisticRegression", {}),
    "svm": ("sklearn.svm", "SVC", {}),
    "ridge": (_LM, "RidgeClassifier", {}),
    "random_forest": (_E, "RandomForestClassifier", {}),
    "xgboost": ("xgboost", "XGBClassifier", {}),
    "xgboost_random_forest": ("xgboost", "XGBRFClassifier", {}),
    "stochastic_gradient_descent": (_LM, "SGDClassifier", {}),
    "perceptron": (_LM, "Perceptron", {}),
    "passive_aggressive": (_LM, "PassiveAggressiveClassifier", {}),
    "gaussian_process": ("sklearn.gaussian_process", "GaussianProcessClassifier", {}),
    "nu_svm": ("sklearn.svm", "NuSVC", {}),
    "ada_boost": (_E, "AdaBoostClassifier", {}),
    "bagging": (_E, "BaggingClassifier", {}),
    "extra_trees": (_E, "ExtraTreesClassifier", {}),
    "gradient_boosting_trees": (_E, "GradientBoostingClassifier", {}),
    "hist_gradient_boosting": (_E, "HistGradientBoostingClassifier", {}),
    "linear_svm": ("sklearn.svm", "LinearSVC", {}),
    "lightgbm": ("lightgbm", "LGBMClassifier", {"verbose": -1}),
    "catboost": ("catboost", "CatBoostClassifier", {"verbose": False, "allow_writing_files": False}),
}
_C = "sklearn.cluster"
_CLUSTERING: dict[str, tuple[str, str, dict[str, Any]]] = {
    "affinity_propagation": (_C, "AffinityPropagation", {}),
    # birch is left out: skops cannot store it (UnsupportedTypeException), and a pickle is
    # never an option for pgml.files.
    "kmeans": (_C, "KMeans", {"n_init": "auto"}),
    "mini_batch_kmeans": (_C, "MiniBatchKMeans", {"n_init": "auto"}),
    "mean_shift": (_C, "MeanShift", {}),
}
_DECOMPOSITION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pca": ("sklearn.decomposition", "PCA", {}),
}
_BY_TASK = {
    "regression": _REGRESSION,
    "classification": _CLASSIFICATION,
    "clustering": _CLUSTERING,
    "decomposition": _DECOMPOSITION,
}


def _installed(module: str) -> bool:
    # Not an import: importing catboost and friends costs seconds, and a validation of the
    # algorithm name must not pay for libraries it does not use.
    package = module.split(".")[0]
    return optional.installed(package)


def known(task: str) -> list[str]:
    """Every algorithm name of `task`, installed or not."""
    return list(_BY_TASK[task])


def available(task: str) -> list[str]:
    """The algorithm names usable for `task` with the libraries installed here."""
    return [name for name, (mod, _, _) in _BY_TASK[task].items() if _installed(mod)]


def library(task: str, algorithm: str) -> str:
    """The top-level library of an algorithm (sklearn, xgboost, lightgbm, catboost)."""
    return _BY_TASK[task][algorithm][0].split(".")[0]


def estimator_factory(task: str, algorithm: str) -> Callable[..., Any]:
    """A callable building the estimator from hyperparams; KeyError for an unknown pair."""
    module, cls_name, defaults = _BY_TASK[task][algorithm]
    cls = getattr(importlib.import_module(module), cls_name)

    def make(**hyperparams: Any) -> Any:
        return cls(**{**defaults, **hyperparams})

    return make
