"""Model files in `pgml.files`, in formats that cannot run code when loaded, and the loaded models.

XGBoost as UBJSON, LightGBM as its text format, CatBoost as cbm, scikit-learn through
skops with a strict trusted-type rule (beyond skops' own safe list, only scikit-learn
classes: skops rebuilds objects from their state, it never unpickles). Never a plain pickle:
whoever can write `pgml.files` must not be able to run code in the proxy.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import DataException, FeatureNotSupported, InternalError
from runtime import optional

# skops already trusts its own list of safe builtins/NumPy types; beyond those a file may
# name only scikit-learn CLASSES (estimators, trees, kernels). A function reference (say
# `builtins.eval` stored as a GP kernel) is refused even from an allowed module.
_TRUSTED_MODULE = "sklearn."
_WIDE_ROWS = 1024  # from this many rows on, XGBoost predicts on every core
# From this many rows on XGBoost's own predict beats ONNX Runtime's tree ensemble. Measured
# here (16 features, 100 trees of depth 6): ONNX Runtime runs about 4 us a row however many
# rows (40 us for one), XGBoost about 340 us a call plus 1-2 us a row: even at 128 rows.
_XGBOOST_ROWS = 128
_PART_SIZE = 64 * 1024 * 1024  # one bytea value stays well under the 1 GB field limit


def dump(model: Any, lib: str) -> tuple[str, bytes]:
    """(path, bytes) of a fitted estimator in its safe format."""
    if lib == "xgboost":
        return "model.ubj", bytes(model.get_booster().save_raw(raw_format="ubj"))
    if lib == "lightgbm":
        return "model.txt", model.booster_.model_to_string().encode()
    if lib == "catboost":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.cbm")
            model.save_model(path, format="cbm")
            with open(path, "rb") as fh:
                return "model.cbm", fh.read()
    import skops.io as sio
    from skops.io.exceptions import UnsupportedTypeException

    try:
        return "model.skops", bytes(sio.dumps(model))
    except UnsupportedTypeException as exc:
        raise FeatureNotSupported(f"{type(model).__name__} cannot be stored without pickle: {exc}") from exc


def parts(data: bytes) -> list[bytes]:
    """The chunks stored as `pgml.files.part` 0, 1, ..."""
    return [data[i : i + _PART_SIZE] for i in range(0, max(len(data), 1), _PART_SIZE)]


def _is_sklearn_class(name: str) -> bool:
    if not name.startswith(_TRUSTED_MODULE):
        return False
    module_name, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type)


def _load_skops(data: bytes) -> Any:
    import skops.io as sio

    untrusted = sio.get_untrusted_types(data=data)
    refused = [t for t in untrusted if not _is_sklearn_class(t)]
    if refused:
        raise DataException(f"model file holds types outside the trusted list: {', '.join(refused)}")
    return sio.loads(data, trusted=untrusted)


@dataclass
class LoadedModel:
    """A model ready to predict, whatever its library; all outputs are NumPy arrays."""

    model_id: int
    task: str
    lib: str
    estimator: Any
    num_features: int
    num_classes: int  # 0 unless classification

    _wide: Any = None
    _narrow: Any = None
    # The ONNX Runtime form (compiled.Compiled), set once it is checked equal to this model:
    # predict and predict_proba then use it. Assigned whole, so a batch sees one or the other.
    compiled: Any = None

    @property
    def engine(self) -> str:
        """Which path serves predictions: "onnx" or "native"."""
        return "native" if self.compiled is None else "onnx"

    def __post_init__(self) -> None:
        # XGBoost's booster predicts in place faster than the sklearn wrapper (no checks,
        # no DMatrix). Measured here: one row took 340 us with OpenMP on every core and
        # 93 us on one thread, while 4,096 rows ran 1.9x faster on every core. So small
        # batches use a one-thread copy and large ones the all-cores booster.
        if self.lib == "xgboost":
            self._wide = self.estimator.get_booster()
            self._narrow = self._wide.copy()
            self._narrow.set_param({"nthread": 1})

    @property
    def _booster(self) -> Any:
        return self._wide

    def _inplace(self, x: np.ndarray) -> np.ndarray:
        booster = self._narrow if len(x) < _WIDE_ROWS else self._wide
        return np.asarray(booster.inplace_predict(x), dtype=np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Regression values (n,) or (n, k) joint; class indices (n,); cluster labels (n,)."""
        compiled = self.compiled
        if self._compiled_for(x):
            out: np.ndarray = compiled.predict(x)
            return out
        return self.predict_native(x)

    def _compiled_for(self, x: np.ndarray) -> bool:
        """Whether the compiled model serves these rows: not when some hold NaN/Infinity it was
        not checked on, nor for XGBoost's batches of `_XGBOOST_ROWS` or more, where its own predict
        is faster (2.7x ONNX Runtime's on 100,000 rows, benchmarks/results/predict.md part b)."""
        compiled = self.compiled
        return (
            compiled is not None
            and (self.lib != "xgboost" or len(x) < _XGBOOST_ROWS)
            and (compiled.nonfinite or bool(np.isfinite(x).all()))
        )

    def predict_native(self, x: np.ndarray) -> np.ndarray:
        """`predict` with the native library, whatever is compiled."""
        if self._booster is not None and self.task != "classification":
            raw = self._inplace(x)
            return raw if raw.ndim > 1 and raw.shape[1] > 1 else raw.ravel()
        if self.task == "classification":
            if self.lib in ("lightgbm", "catboost", "xgboost"):
                best: np.ndarray = np.argmax(self.predict_proba_native(x), axis=1).astype(np.float64)
                return best
            labels: np.ndarray = np.asarray(self.estimator.predict(x), dtype=np.float64).ravel()
            return labels
        if self.task == "decomposition":
            return np.asarray(self.estimator.transform(x), dtype=np.float64)
        out = np.asarray(self.estimator.predict(x), dtype=np.float64)
        return out if out.ndim > 1 and out.shape[1] > 1 else out.ravel()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes)."""
        compiled = self.compiled
        if compiled is not None and compiled.has_proba and self._compiled_for(x):
            out: np.ndarray = compiled.predict_proba(x)
            return out
        return self.predict_proba_native(x)

    def predict_proba_native(self, x: np.ndarray) -> np.ndarray:
        """`predict_proba` with the native library, whatever is compiled."""
        if self.lib == "lightgbm" or self._booster is not None:
            p = (
                self._inplace(x)
                if self._booster is not None
                else np.asarray(self.estimator.predict(x), dtype=np.float64)
            )
            return np.column_stack([1 - p, p]) if p.ndim == 1 else p
        if hasattr(self.estimator, "predict_proba"):
            return np.asarray(self.estimator.predict_proba(x), dtype=np.float64)
        # Models without probabilities (svm without probability=True, ridge): one-hot of the decision.
        labels = np.asarray(self.estimator.predict(x), dtype=np.int64).ravel()
        return np.eye(max(self.num_classes, int(labels.max(initial=0)) + 1))[labels]


def load(
    model_id: int, task: str, lib: str, algorithm: str, data: bytes, num_features: int, num_classes: int
) -> LoadedModel:
    """Rebuild a model from its stored bytes; raises DataException for a refused or broken file."""
    try:
        estimator = _load(task, lib, algorithm, data)
    except DataException:
        raise
    except Exception as exc:
        raise InternalError(f"model {model_id} could not be loaded from pgml.files: {exc}") from exc
    return LoadedModel(model_id, task, lib, estimator, num_features, num_classes)


def _load(task: str, lib: str, algorithm: str, data: bytes) -> Any:
    if lib == "xgboost":
        import xgboost as xgb

        rf = algorithm == "xgboost_random_forest"
        if task == "classification":
            est: Any = xgb.XGBRFClassifier() if rf else xgb.XGBClassifier()
        else:
            est = xgb.XGBRFRegressor() if rf else xgb.XGBRegressor()
        est.load_model(bytearray(data))
        return est
    if lib == "lightgbm":
        import lightgbm as lgb

        return lgb.Booster(model_str=data.decode())
    if lib == "catboost":
        optional.require("catboost", "this model (trained with catboost)")
        import catboost as cb

        model: Any = cb.CatBoostClassifier() if task == "classification" else cb.CatBoostRegressor()
        model.load_model(blob=data)
        return model
    return _load_skops(data)
