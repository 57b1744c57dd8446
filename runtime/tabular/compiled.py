"""Tabular models compiled for serving: ONNX conversion, the equality check, the ONNX Runtime sessions.

A model is converted (onnxmltools for XGBoost and LightGBM, CatBoost's own ONNX export,
skl2onnx for scikit-learn) and then served by ONNX Runtime only when its predictions on
the check rows (the test split at training time; rows of the snapshot's relation for a
model stored before this existed) equal the native model's: labels exactly, values and
probabilities within 1e-5 relative. Anything else (a converter that refuses, a mismatch,
a task other than single-output regression and classification) keeps the native model.
The ONNX file lives beside the native one in `pgml.files` as `model.onnx`; ONNX holds
operators, never code, so reading one is as safe as the native formats.

Measured here (issue 13): one XGBoost row costs about 280 us in `inplace_predict` and
7-9 us in ONNX Runtime, which is why the one-row path wants this.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .storage import LoadedModel

log = logging.getLogger(__name__)

ONNX_PATH = "model.onnx"
_WIDE_ROWS = 1024  # from this many rows on, a session on every core; below, one thread
_CHECK_ROWS = 4096  # at most this many check rows (the conversion must not cost a second pass of training)
_RTOL, _ATOL = 1e-5, 1e-6
_OPSET = {"": 15, "ai.onnx.ml": 3}
_NONFINITE = "pgml_nonfinite_checked"  # metadata of a stored file: "1" when NaN/Infinity rows were equal


def convertible(task: str, lib: str) -> bool:
    return task in ("regression", "classification") and lib in ("xgboost", "lightgbm", "catboost", "sklearn")


def convert(model: LoadedModel) -> bytes:
    """The model as ONNX bytes; raises whatever the converter raises when it refuses."""
    width, est = model.num_features, model.estimator
    if model.lib == "catboost":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, ONNX_PATH)
            est.save_model(path, format="onnx")
            with open(path, "rb") as fh:
                return fh.read()
    if model.lib in ("xgboost", "lightgbm"):
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType as MlFloat

        types = [("x", MlFloat([None, width]))]
        if model.lib == "xgboost":
            onx = onnxmltools.convert_xgboost(est, initial_types=types, target_opset=_OPSET[""])
        else:
            onx = onnxmltools.convert_lightgbm(
                est, initial_types=types, target_opset=_OPSET[""], zipmap=False
            )
        return bytes(onx.SerializeToString())
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(est): {"zipmap": False}} if model.task == "classification" else None
    types = [("x", FloatTensorType([None, width]))]
    onx = to_onnx(est, initial_types=types, options=options, target_opset=_OPSET)
    return bytes(onx.SerializeToString())  # type: ignore[union-attr]


def _session(data: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No spinning workers: they would take the CPU the event loop and the other predicts need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # LightGBM's label output declares shape [1]: a warning per batch otherwise
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass
class Compiled:
    """ONNX Runtime sessions for one model: `predict` and `predict_proba` as LoadedModel's."""

    data: bytes
    task: str
    has_proba: bool  # whether the native model has probabilities (else predict_proba stays native)
    # Whether rows holding NaN or Infinity were checked equal too: some converters do not
    # carry the native model's missing-value branches (scikit-learn's trees), and then such
    # rows are predicted natively.
    nonfinite: bool = False
    _narrow: Any = None
    _wide: Any = None

    def __post_init__(self) -> None:
        self._narrow = _session(self.data, 1)
        self._wide = _session(self.data, 0)  # 0: ONNX Runtime's default, one thread per core
        self._input = self._narrow.get_inputs()[0].name
        meta = self._narrow.get_modelmeta().custom_metadata_map
        self.nonfinite = self.nonfinite or meta.get(_NONFINITE) == "1"

    def _run(self, x: np.ndarray) -> list[Any]:
        session = self._narrow if len(x) < _WIDE_ROWS else self._wide
        out: list[Any] = session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(x)[0], dtype=np.float64).ravel()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(x)[1], dtype=np.float64)


def load(data: bytes, native: LoadedModel) -> Compiled:
    return Compiled(data, native.task, _has_proba(native))


def _has_proba(native: LoadedModel) -> bool:
    return native.task == "classification" and (
        native.lib != "sklearn" or hasattr(native.estimator, "predict_proba")
    )


def nonfinite_rows(x: np.ndarray, takes_nan: bool, takes_inf: bool) -> np.ndarray:
    """Where the model takes them, the first rows of `x` with one feature NaN (missing) or
    +/-Infinity in turn; empty when it takes neither."""
    base = np.asarray(x[:8], dtype=np.float32)
    extra = []
    for value, wanted in ((np.nan, takes_nan), (np.inf, takes_inf), (-np.inf, takes_inf)):
        if wanted and len(base):
            for col in range(x.shape[1]):
                rows = base.copy()
                rows[:, col] = value
                extra.append(rows)
    return np.vstack(extra) if extra else base[:0]


def mismatch(compiled: Compiled, native: LoadedModel, x: np.ndarray) -> str | None:
    """None when the compiled model answers as the native one on `x`, else what differs."""
    if not len(x):
        return "no rows to check on"
    ours, theirs = compiled.predict(x), native.predict_native(x)
    if ours.shape != theirs.shape:
        return f"output shape {ours.shape} differs from the native {theirs.shape}"
    if native.task == "classification":
        wrong = int(np.sum(ours != theirs))
        if wrong:
            return f"{wrong} of {len(x)} labels differ"
        if compiled.has_proba:
            p, q = compiled.predict_proba(x), native.predict_proba_native(x)
            if p.shape != q.shape or not np.allclose(p, q, rtol=_RTOL, atol=_ATOL, equal_nan=True):
                return "probabilities differ beyond 1e-5"
        return None
    if not np.allclose(ours, theirs, rtol=_RTOL, atol=_ATOL * max(1.0, float(np.nanmax(np.abs(theirs)))),
                       equal_nan=True):
        worst = float(np.nanmax(np.abs(ours - theirs)))
        return f"values differ by up to {worst:.3g}"
    return None


def accepts(model: LoadedModel) -> tuple[bool, bool]:
    """Whether the native model predicts on a row of NaN, and on a row of Infinity (one call each)."""
    out = []
    for value in (np.nan, np.inf):
        try:
            model.predict_native(np.full((1, model.num_features), value, dtype=np.float32))
            out.append(True)
        except Exception:  # any refusal means "not accepted": each library raises its own type
            out.append(False)
    return out[0], out[1]


def build(native: LoadedModel, x: np.ndarray) -> tuple[Compiled | None, str]:
    """(the checked compiled model or None, what serves and why, for the log and a notice)."""
    if not convertible(native.task, native.lib):
        return None, "native: no ONNX conversion for this task or library"
    x = np.asarray(x[:_CHECK_ROWS], dtype=np.float32)
    x = x[np.isfinite(x).all(axis=1)]
    try:
        compiled = load(convert(native), native)
        differs = mismatch(compiled, native, x)
        odd = nonfinite_rows(x, *accepts(native))
        compiled.nonfinite = bool(len(odd)) and mismatch(compiled, native, odd) is None
    except Exception as exc:  # each converter raises its own types; any refusal keeps native
        return None, f"native: the ONNX conversion failed ({type(exc).__name__}: {str(exc)[:300]})"
    if differs is not None:
        return None, f"native: ONNX predictions differ ({differs})"
    compiled.data = _with_meta(compiled.data, {_NONFINITE: "1" if compiled.nonfinite else "0"})
    rows = len(x) + (len(odd) if compiled.nonfinite else 0)
    native_odd = not compiled.nonfinite and len(odd)
    nan = "; rows holding NaN or Infinity are predicted natively" if native_odd else ""
    return compiled, f"ONNX Runtime: checked equal to the native model on {rows} rows{nan}"


def _with_meta(data: bytes, meta: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    for key, value in meta.items():
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, key: value})
    return bytes(proto.SerializeToString())
