"""Feature columns: their kinds, the statistics fitted on training rows, and the transform.

The same `transform` builds the training matrix and the matrix of a row-form
`pgml.predict('p', t.*)`, so the preprocessing recorded in the snapshot (encode, impute,
scale per column) is exactly what prediction applies. Column specs are JSON (stored in
`pgml.snapshots.columns`), so a model is served by any proxy that reads the snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.errors import InvalidParameterValue, NullValueNotAllowed

ENCODES = ("native", "target", "one_hot", "ordinal")
IMPUTES = ("error", "mean", "median", "mode", "min", "max", "zero")
SCALES = ("preserve", "standard", "min_max", "max_abs", "robust")
_NUMERIC = {"smallint", "integer", "bigint", "real", "double precision", "numeric"}
Spec = dict[str, Any]


def kind_of(pg_type: str) -> str:
    """'numeric', 'bool', 'array' (numeric arrays) or 'text' (everything else is categorical)."""
    base = pg_type.split("(")[0].strip()
    if base.endswith("[]"):
        return "array"
    if base in _NUMERIC:
        return "numeric"
    if base == "boolean":
        return "bool"
    return "text"


def validate(preprocess: Mapping[str, Any], names: Sequence[str]) -> None:
    """Raise 22023 for a preprocess entry naming an unknown column or an unknown step."""
    for column, steps in preprocess.items():
        if column not in names:
            raise InvalidParameterValue(
                f"preprocess names column {column!r}, which is not in the relation",
                hint=f"columns: {', '.join(names)}",
            )
        if not isinstance(steps, Mapping):
            raise InvalidParameterValue(f"preprocess for column {column!r} must be a JSON object")
        for key, value in steps.items():
            allowed = {"encode": ENCODES, "impute": IMPUTES, "scale": SCALES}.get(key)
            if allowed is None:
                raise InvalidParameterValue(
                    f"preprocess step {key!r} for {column!r} is unknown", hint="steps: encode, impute, scale"
                )
            if not (value in allowed or (key == "encode" and isinstance(value, list))):
                raise InvalidParameterValue(
                    f"preprocess {key} {value!r} for {column!r} is unknown",
                    hint=f"accepted: {', '.join(allowed)}",
                )


def as_column(kind: str, values: Sequence[Any]) -> np.ndarray:
    """Python values of one column (None for NULL) as the array `transform` expects."""
    if kind == "text":
        return np.asarray([None if v is None else str(v) for v in values], dtype=object)
    if kind == "array":
        rows = [np.asarray(v, dtype=np.float64).ravel() if v is not None else None for v in values]
        width = max((r.size for r in rows if r is not None), default=0)
        out = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            if r is not None:
                out[i, : r.size] = r[:width]
        return out
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _numeric_stats(x: np.ndarray) -> dict[str, float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {k: 0.0 for k in ("mean", "std", "min", "max", "median", "mode", "q1", "q3", "max_abs")}
    values, counts = np.unique(x, return_counts=True)
    q1, median, q3 = np.percentile(x, [25, 50, 75])
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "median": float(median),
        "mode": float(values[np.argmax(counts)]),
        "q1": float(q1),
        "q3": float(q3),
        "max_abs": float(np.abs(x).max()),
    }


def fit(spec: Spec, x: np.ndarray, y: np.ndarray | None) -> None:
    """Record in `spec['statistics']` what the transform of this column needs (train rows only)."""
    steps = spec["preprocessor"]
    if spec["kind"] != "text":
        spec["statistics"] = _numeric_stats(np.asarray(x, dtype=np.float64).ravel())
        return
    present = [v for v in x if v is not None]
    cats, counts = np.unique(np.asarray(present, dtype=object).astype(str), return_counts=True)
    stats: dict[str, Any] = {
        "categories": [str(c) for c in cats],
        "mode": str(cats[np.argmax(counts)]) if len(cats) else None,
    }
    if isinstance(steps["encode"], list):
        stats["categories"] = [str(v) for v in steps["encode"]]
    if steps["encode"] == "target" and y is not None:
        yv = np.asarray(y, dtype=np.float64).reshape(len(x), -1)[:, 0]
        mask = np.asarray([v is not None for v in x])
        stats["target_means"] = {str(c): float(yv[mask & (x == c)].mean()) for c in cats}
        stats["target_mean"] = float(yv.mean()) if yv.size else 0.0
    spec["statistics"] = stats
    codes = _encode_text(spec, x)
    spec["statistics"]["encoded"] = _numeric_stats(codes.ravel())


def width(spec: Spec) -> int:
    """How many model features this column becomes."""
    if spec["kind"] == "text" and spec["preprocessor"]["encode"] == "one_hot":
        return len(spec["statistics"]["categories"])
    return int(spec.get("size", 1))


def _impute_hint(column: str, how: str) -> str:
    steps = json.dumps({column: {"impute": how}})
    return f"impute them, for example preprocess => '{steps}'"


def _encode_text(spec: Spec, x: np.ndarray) -> np.ndarray:
    stats, steps = spec["statistics"], spec["preprocessor"]
    encode = steps["encode"]
    if steps["impute"] != "error" and stats.get("mode") is not None:
        x = np.asarray([stats["mode"] if v is None else v for v in x], dtype=object)
    elif any(v is None for v in x):
        raise NullValueNotAllowed(
            f"column {spec['name']!r} has NULL values",
            hint=_impute_hint(spec["name"], "mode"),
        )
    if encode == "one_hot":
        cats = stats["categories"]
        return np.asarray([[1.0 if v == c else 0.0 for c in cats] for v in x], dtype=np.float64).reshape(
            len(x), len(cats)
        )
    if encode == "target":
        means, default = stats.get("target_means", {}), stats.get("target_mean", 0.0)
        return np.asarray([means.get(v, default) for v in x], dtype=np.float64)
    index = {c: float(i) for i, c in enumerate(stats["categories"])}
    # An unseen category is not a NULL: it gets a code of its own, outside the trained ones.
    return np.asarray([index.get(v, -1.0) for v in x], dtype=np.float64)


def _impute(spec: Spec, x: np.ndarray, stats: Mapping[str, float]) -> np.ndarray:
    missing = np.isnan(x)
    if not missing.any():
        return x
    how = spec["preprocessor"]["impute"]
    if how == "error":
        raise NullValueNotAllowed(
            f"column {spec['name']!r} has NULL values",
            hint=_impute_hint(spec["name"], "mean"),
        )
    fill = 0.0 if how == "zero" else stats[how]
    return np.where(missing, fill, x)


def _scale(how: str, x: np.ndarray, s: Mapping[str, float]) -> np.ndarray:
    if how == "standard":
        return (x - s["mean"]) / (s["std"] or 1.0)
    if how == "min_max":
        return (x - s["min"]) / ((s["max"] - s["min"]) or 1.0)
    if how == "max_abs":
        return x / (s["max_abs"] or 1.0)
    if how == "robust":
        return (x - s["median"]) / ((s["q3"] - s["q1"]) or 1.0)
    return x


def transform(specs: Sequence[Spec], columns: Mapping[str, np.ndarray], n_rows: int) -> np.ndarray:
    """The model's feature matrix (float32, n_rows x sum of widths) for feature columns `specs`."""
    parts: list[np.ndarray] = []
    for spec in specs:
        x = columns[spec["name"]]
        if spec["kind"] == "text":
            x = _encode_text(spec, x)
            stats = spec["statistics"]["encoded"]
            if spec["preprocessor"]["encode"] == "one_hot":
                parts.append(x)
                continue
        else:
            stats = spec["statistics"]
        x = _impute(spec, np.asarray(x, dtype=np.float64), stats)
        x = _scale(spec["preprocessor"]["scale"], x, stats)
        parts.append(x.reshape(n_rows, -1))
    if not parts:
        return np.zeros((n_rows, 0), dtype=np.float32)
    return np.hstack(parts).astype(np.float32)
