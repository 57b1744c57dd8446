"""Serving: deployed-model resolution, the in-process model cache and batched prediction.

Model ids are immutable, so loaded models are cached by id for the process's life; the
project -> deployed id map is the only thing that changes, and a NOTIFY on
`pgml_deploy` (from any proxy instance) drops the entry so the next call re-reads it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg import DataError, adapt, pq

from core import functions
from core.errors import (
    DataException,
    InternalError,
    InvalidParameterValue,
    InvalidTextRepresentation,
    NullValueNotAllowed,
    UndefinedFunction,
)
from core.stop import Stop
from runtime.batcher import Batcher, Policy

from . import compiled, preprocess, registry, storage

log = logging.getLogger(__name__)

OPS = functions.served_by("tabular", "predict")
# A compiled (ONNX) model's batch of at most this many rows may run on the event loop
# (runtime/batcher.py), within the measured budget: one row costs 10-30 us there, less than
# the hop to a worker thread.
_INLINE_ROWS = 64


@dataclass
class Served:
    """A loaded model with what turning rows into features and outputs into values needs."""

    model: storage.LoadedModel
    features: list[dict[str, Any]]
    classes: list[Any]
    columns: list[str]  # every column of the snapshot, in relation order
    # Whether the library takes NaN (missing) / Infinity in a feature: probed once at load, so
    # a call holding one the model refuses fails alone, before it is batched with others.
    takes_nan: bool = True
    takes_inf: bool = True
    # The class labels as numbers, by class index (None: text labels, answered by index);
    # made at the first `labels`, for every later call.
    _label_table: np.ndarray | None = field(default=None, init=False, repr=False)
    _label_checked: bool = field(default=False, init=False, repr=False)

    def named(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """The row keyed by column names.

        A record of the relation's type (``t.*``) carries the names; an anonymous
        ``ROW(...)`` arrives with Postgres's f1, f2, ... keys and is matched by position to
        the snapshot's columns (all of them, or the feature columns alone).
        """
        names = [s["name"] for s in self.features]
        if not row or any(n in row for n in names):
            return row
        keys = sorted(row, key=lambda k: int(k[1:]) if re.fullmatch(r"f\d+", k) else 0)
        values = [row[k] for k in keys]
        for columns in (self.columns, names):
            if len(values) == len(columns):
                return dict(zip(columns, values, strict=True))
        raise InvalidParameterValue(
            f"the row has {len(values)} fields but the model's relation has {len(self.columns)} columns"
            f" ({len(names)} of them features)"
        )

    def labels(self, indices: np.ndarray) -> list[float]:
        """`label` for a whole array of predicted class indices."""
        if not self._label_checked:
            if self.classes and all(isinstance(c, (int, float, bool)) for c in self.classes):
                self._label_table = np.asarray([float(c) for c in self.classes])
            self._label_checked = True
        table = self._label_table
        if table is None:
            return [float(v) for v in indices.tolist()]
        mapped: list[float] = table[indices.astype(np.int64)].tolist()
        return mapped

    def label(self, index: float) -> float:
        """A predicted class index as the label value (text labels answer their index)."""
        if not self.classes:
            return float(index)
        value = self.classes[int(index)]
        return float(value) if isinstance(value, (int, float, bool)) else float(index)


class Predictor:
    def __init__(
        self,
        pool: registry.Pool,
        executor: Executor,
        max_rows: int,
        max_queue: int,
        max_models: int = 32,
        onnx: bool = True,
        inline_budget_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._executor = executor
        self._max_rows, self._max_queue = max_rows, max_queue
        self._deployed: dict[str, int] = {}
        # Bumped by every forget: a lookup that started before a deploy's NOTIFY must not
        # put the old model id back into the cache after the NOTIFY cleared it.
        self._generation = 0
        self._lookups: dict[str, asyncio.Task[int]] = {}
        self._models: OrderedDict[int, asyncio.Task[Served]] = OrderedDict()
        self._batchers: dict[tuple[int, str], Batcher] = {}
        self._max_models = max_models
        self._onnx = onnx
        self._inline_budget_s = inline_budget_s
        self._compiling: set[asyncio.Task[None]] = set()
        # One-row features given as a statement's literal (the same list object each time the
        # statement runs: planner/execute.answer_now), already converted and checked.
        self._dense: dict[int, tuple[object, int, np.ndarray]] = {}

    def forget_deployment(self, project: str | None = None) -> None:
        """Drop the cached deployment of `project` (all of them when None)."""
        self._generation += 1
        if project is None:
            self._deployed.clear()
        else:
            self._deployed.pop(project, None)

    async def model_id(self, project: str) -> int:
        cached = self._deployed.get(project)
        if cached is not None:
            return cached
        # Single flight: concurrent misses for one project share one query (and so resume
        # together, which keeps their rows in one batch).
        lookup = self._lookups.get(project)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._lookup(project))
            self._lookups[project] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(project, None))
        return await asyncio.shield(lookup)

    async def _lookup(self, project: str) -> int:
        generation = self._generation
        async with self._pool.connection() as conn:
            model_id = await registry.deployed_model_id(conn, project)
        if generation == self._generation:
            self._deployed[project] = model_id
        return model_id

    async def served(self, model_id: int) -> Served:
        task = self._models.get(model_id)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.get_running_loop().create_task(self._load(model_id))
            self._models[model_id] = task
            self._evict()
        self._models.move_to_end(model_id)
        if task.done():
            return task.result()
        return await asyncio.shield(task)

    def _evict(self) -> None:
        """Keep at most `max_models` loaded: the least recently used go, with their batchers."""
        while len(self._models) > self._max_models:
            old, _ = self._models.popitem(last=False)
            for key in [k for k in self._batchers if k[0] == old]:
                batcher = self._batchers.pop(key)
                asyncio.get_running_loop().create_task(batcher.close())

    async def _load(self, model_id: int) -> Served:
        async with self._pool.connection() as conn:
            rec = await registry.model_record(conn, model_id)
        columns = rec["columns"] or []
        labels = registry.label_specs(columns)
        classes = (
            labels[0]["statistics"].get("classes", []) if labels and rec["task"] == "classification" else []
        )
        lib = {"model.ubj": "xgboost", "model.txt": "lightgbm", "model.cbm": "catboost"}.get(
            rec["path"], "sklearn"
        )
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(
            self._executor,
            storage.load,
            model_id,
            rec["task"],
            lib,
            rec["algorithm"],
            rec["data"],
            int(rec["num_features"]),
            len(classes),
        )
        names = [c["name"] for c in sorted(columns, key=lambda c: int(c.get("position", 0)))]
        takes_nan, takes_inf = await loop.run_in_executor(self._executor, compiled.accepts, model)
        served = Served(model, registry.feature_specs(columns), classes, names, takes_nan, takes_inf)
        await self._compile(served, rec)
        return served

    async def _compile(self, served: Served, rec: Mapping[str, Any]) -> None:
        """Serve with the stored ONNX form when there is one; else convert in the background."""
        model = served.model
        what = f"model {model.model_id} ({model.lib} {model.task})"
        if not self._onnx or not compiled.convertible(model.task, model.lib):
            log.info("%s is served by native (no ONNX conversion here)", what)
            return
        if rec["onnx"] is None:
            # A model stored before ONNX serving: native now, ONNX once checked (no call waits).
            task = asyncio.get_running_loop().create_task(self._compile_later(served, rec))
            self._compiling.add(task)
            task.add_done_callback(self._compiling.discard)
            return
        try:
            model.compiled = await asyncio.get_running_loop().run_in_executor(
                None, compiled.load, rec["onnx"], model
            )
            log.info("%s is served by ONNX Runtime (its model.onnx in pgml.files)", what)
        except Exception as exc:  # a broken file keeps the native model, which is always there
            log.warning("%s is served by native: its model.onnx does not load (%s)", what, exc)

    async def _compile_later(self, served: Served, rec: Mapping[str, Any]) -> None:
        model = served.model
        what = f"model {model.model_id} ({model.lib} {model.task})"
        try:
            x = await self._check_rows(served, rec)
            built, why = await asyncio.get_running_loop().run_in_executor(None, compiled.build, model, x)
            if built is not None:
                async with self._pool.connection() as conn:
                    await registry.add_file(conn, model.model_id, compiled.ONNX_PATH, built.data)
                model.compiled = built
            log.info("%s is served by %s", what, why)
        except Exception as exc:  # the check rows cannot be read (the relation is gone): stay native
            log.warning("%s is served by native: no ONNX form (%s: %s)", what, type(exc).__name__, exc)

    async def _check_rows(self, served: Served, rec: Mapping[str, Any]) -> np.ndarray:
        """Feature rows of the model's snapshot relation as it is now, transformed as at predict."""
        relation = f"pgml.snapshot_{rec['snapshot_id']}" if rec["materialized"] else rec["relation_name"]
        if relation is None:
            raise InvalidParameterValue("the model has no snapshot to check a conversion on")
        kinds = [(s["name"], s["kind"]) for s in served.features]
        async with self._pool.connection() as conn:
            data, n = await registry.read_columns(conn, str(relation), kinds)
        return preprocess.transform(served.features, data, n)

    def _batcher(self, served: Served, op: str) -> Batcher:
        key = (served.model.model_id, op)
        batcher = self._batchers.get(key)
        if batcher is None:
            fn = served.model.predict_proba if op == "predict_proba" else served.model.predict
            # No timer: a few loop turns gather the rows of concurrent callers, one batch at a time.
            policy = Policy(
                max_batch_size=self._max_queue, max_batch_tokens=self._max_rows, wait_s=0.0,
                queue_size=self._max_queue, in_flight=1, inline_budget_s=self._inline_budget_s,
            )
            model = served.model

            def inline(blocks: list[np.ndarray]) -> bool:
                # Rows holding NaN or Infinity may go to the native library (LoadedModel.predict),
                # which can take milliseconds: those stay in the pool.
                compiled = model.compiled
                return (
                    self._inline_budget_s > 0
                    and compiled is not None
                    and sum(len(b) for b in blocks) <= _INLINE_ROWS
                    and (compiled.nonfinite or all(np.isfinite(b).all() for b in blocks))
                )

            batcher = Batcher(f"{model.model_id}/{op}", _stacked(fn), self._executor, policy, inline)
            self._batchers[key] = batcher
        return batcher

    async def run(self, op: str, calls: Sequence[Mapping[str, Any]], stop: Stop | None = None) -> list[Any]:
        """One result per call; ONE batched library call per model for all of them."""
        # Resolve each distinct project or model id once, not once per row.
        keys: list[int | str] = [
            int(c["model_id"]) if c.get("model_id") is not None else str(c["project_name"]) for c in calls
        ]
        distinct = list(dict.fromkeys(keys))
        # Few awaits on the common path (one project, cached): one-row calls from many
        # connections then reach the batcher within the same loop turn and share a batch.
        if len(distinct) == 1:
            resolved = [await self._resolve(distinct[0])]
        else:
            resolved = list(await asyncio.gather(*(self._resolve(k) for k in distinct)))
        ids = dict(zip(distinct, resolved, strict=True))
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(ids[key], []).append(i)
        results: list[Any] = [None] * len(calls)
        if len(groups) == 1:
            [(mid, idx)] = groups.items()
            await self._run_group(
                op, mid, list(calls) if len(idx) == len(calls) else [calls[i] for i in idx], idx, results,
                stop,
            )
            return results
        await asyncio.gather(
            *(
                self._run_group(op, mid, [calls[i] for i in idx], idx, results, stop)
                for mid, idx in groups.items()
            )
        )
        return results

    async def run_matrix(
        self, op: str, fixed: Mapping[str, Any], x: Any, stop: Stop | None = None
    ) -> list[Any] | None:
        """`run` for many rows of one project whose features are one matrix (a table streamed
        through `predict`, core.interfaces.ColumnCalls): no Python object per row on the way
        in. None when the matrix is not the model's plain case (another width, NaN or
        infinity, a row): `run` then takes the rows one by one and names what is wrong."""
        if op != "predict" or not isinstance(x, np.ndarray) or x.ndim != 2 or not len(x):
            return None
        key = int(fixed["model_id"]) if fixed.get("model_id") is not None else str(fixed["project_name"])
        served = await self.served(await self._resolve(key))
        _check_op(op, served.model.task)
        if x.shape[1] != served.model.num_features:
            return None
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            return None
        out = await self._batcher(served, op).submit_one(x, len(x), stop)
        results: list[Any] = [None] * len(x)
        _place(op, served, out, [1] * len(x), list(range(len(x))), results)
        return results

    async def _resolve(self, key: int | str) -> int:
        return key if isinstance(key, int) else await self.model_id(key)

    async def _run_group(
        self,
        op: str,
        model_id: int,
        calls: list[Mapping[str, Any]],
        where: list[int],
        results: list[Any],
        stop: Stop | None = None,
    ) -> None:
        served = await self.served(model_id)
        _check_op(op, served.model.task)
        x, counts = self._matrix(op, served, calls)
        # No rows at all (predict_batch of an empty array): nothing to ask the library.
        out = await self._batcher(served, op).submit_one(x, len(x), stop) if len(x) else np.empty((0,))
        _place(op, served, out, counts, where, results)

    def run_now(self, op: str, calls: Sequence[Mapping[str, Any]]) -> list[Any] | None:
        """`run`'s results when they can be had without waiting: one project or model id whose
        deployment and model are already loaded, rows that may run on the loop now
        (Batcher.can_run_now). None otherwise, and `run` is the way. The same checks raise the
        same errors."""
        if not calls:
            return None
        keys = {
            int(c["model_id"]) if c.get("model_id") is not None else str(c["project_name"]) for c in calls
        }
        if len(keys) != 1:
            return None
        (key,) = keys
        model_id = key if isinstance(key, int) else self._deployed.get(key)
        task = self._models.get(model_id) if model_id is not None else None
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        served = task.result()
        _check_op(op, served.model.task)
        x, counts = self._matrix(op, served, list(calls))
        batcher = self._batcher(served, op)
        if not len(x) or not batcher.can_run_now(x, len(x)):
            return None
        self._models.move_to_end(served.model.model_id)
        results: list[Any] = [None] * len(calls)
        _place(op, served, batcher.run_now(x, len(x)), counts, list(range(len(calls))), results)
        return results

    def _matrix(
        self, op: str, served: Served, calls: list[Mapping[str, Any]]
    ) -> tuple[np.ndarray, list[int]]:
        """The feature rows of every call, and how many rows each call contributed."""
        width = served.model.num_features
        if all("row" in c for c in calls):
            rows = [served.named(c["row"]) for c in calls]
            cols = {
                s["name"]: preprocess.as_column(s["kind"], [r.get(s["name"]) for r in rows])
                for s in served.features
            }
            return preprocess.transform(served.features, cols, len(rows)), [1] * len(rows)
        if any("row" in c for c in calls):
            parts = [self._matrix(op, served, [c]) for c in calls]
            return np.vstack([p[0] for p in parts]), [p[1][0] for p in parts]
        if op == "predict":
            if len(calls) == 1:  # a one-row statement: its literal's matrix may be known
                feats = calls[0]["features"]
                known = self._dense.get(id(feats))
                if known is not None and known[0] is feats and known[1] == width:
                    return known[2], [1]
            x = _dense(calls, width)
            if x is not None:
                if len(calls) == 1:
                    if len(self._dense) >= 256:
                        self._dense.clear()
                    x.flags.writeable = False  # shared by every later call: nothing may change it
                    self._dense[id(feats)] = (feats, width, x)
                return x, [1] * len(calls)
        # A multi-dimensional array (an image column, smallint[][]) is flattened, as at training.
        feats = [_features(_flat(c["features"]), op) for c in calls]
        for f, c in zip(feats, calls, strict=True):
            _check_finite(served, f, op, c["features"])
        if op == "predict_batch":
            arrays = [
                _floats(f).reshape(-1, width) if len(f) % width == 0 else _mismatch(len(f), width, True)
                for f in feats
            ]
            return np.vstack(arrays), [len(a) for a in arrays]
        bad = next((len(f) for f in feats if len(f) != width), None)
        if bad is not None:
            _mismatch(bad, width, False)
        return _floats(feats).reshape(len(feats), width), [1] * len(feats)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per `model_id/op` batcher: library calls and rows so far (for metrics and tests)."""
        return {
            f"{mid}/{op}": {"batches": b.stats.batches, "rows": b.stats.cost}
            for (mid, op), b in self._batchers.items()
        }

    def engine(self, model_id: int) -> str | None:
        """"onnx" or "native" for a loaded model; None when it is not loaded (for tests and SHOW)."""
        task = self._models.get(model_id)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result().model.engine

    async def close(self) -> None:
        for task in list(self._compiling):
            task.cancel()
        for batcher in self._batchers.values():
            await batcher.close()


_REAL_ARRAY = adapt.Transformer().get_loader(1021, pq.Format.TEXT)  # real[]'s text form
_SQL_TYPE = {bool: "boolean", int: "integer", float: "double precision", dict: "jsonb"}


def _features(value: Any, op: str) -> np.ndarray:
    """A features argument as float32, NULL elements as NaN; what Postgres would say when it is none.

    A scalar is 42883 (no pgml.predict takes one); text is read as an array literal
    (`'{1,2}'`), with 22P02 when it is malformed or an element is not a number.
    """
    if isinstance(value, str):
        value = _array_text(value)
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False).ravel()
    if not isinstance(value, (list, tuple)):
        kind = _SQL_TYPE.get(type(value), type(value).__name__)
        raise UndefinedFunction(
            f"function pgml.{op}(text, {kind}) does not exist",
            hint="features are an array (real[], float8[], int[] or bool[]) or a row",
        )
    try:
        arr = _floats(value)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.ndim == 1:
        return arr
    for v in value:
        if isinstance(v, (list, tuple)):
            raise InvalidParameterValue(f"pgml.{op} takes a one-dimensional features array")
        if v is not None:
            try:
                float(v)
            except (TypeError, ValueError):
                raise InvalidTextRepresentation(f'invalid input syntax for type real: "{v}"') from None
    raise InvalidParameterValue(f"pgml.{op}: the features array cannot be read as real[]")


def _array_text(text: str) -> list[Any]:
    try:
        return list(_REAL_ARRAY.load(text.encode()))
    except DataError as exc:
        raise InvalidTextRepresentation(f'malformed array literal: "{text[:200]}"', detail=str(exc)) from exc
    except ValueError as exc:
        raise InvalidTextRepresentation(f'invalid input syntax for type real: "{text[:200]}"') from exc


def _check_finite(served: Served, x: np.ndarray, op: str, given: Any) -> None:
    """22004 for NULL / 22023 for NaN or Infinity the model refuses, before batching with others."""
    nan, inf = not served.takes_nan and np.isnan(x).any(), not served.takes_inf and np.isinf(x).any()
    if not (nan or inf):
        return
    what = f"model {served.model.model_id} ({served.model.lib} {served.model.task})"
    if nan and isinstance(given, (list, tuple)) and any(v is None for v in given):
        raise NullValueNotAllowed(
            f"pgml.{op}: the features array holds NULL, which {what} does not accept as missing",
            hint="pass a value for every feature, or train a tree-based algorithm (xgboost, lightgbm)",
        )
    value = "NaN" if nan else "Infinity (or a value beyond real's range)"
    raise InvalidParameterValue(f"pgml.{op}: the features hold {value}, which {what} cannot take")


def _place(
    op: str, served: Served, out: np.ndarray, counts: list[int], where: list[int], results: list[Any]
) -> None:
    """Each call's result from the library's output rows (`counts` rows per call) into
    `results` at the call's position in `where`."""
    if op == "predict" and out.ndim == 1 and len(out) == len(where):
        # The common case, one value per call: converted for all rows at once.
        values = served.labels(out) if served.model.task == "classification" else out.tolist()
        for pos, value in zip(where, values, strict=True):
            results[pos] = value
        return
    start = 0
    for pos, count in zip(where, counts, strict=True):
        results[pos] = _shape(op, served, out[start : start + count])
        start += count


def _stacked(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A batch function over row blocks: one library call on them stacked, each its own slice."""

    def run(blocks: list[np.ndarray]) -> list[np.ndarray]:
        x = blocks[0] if len(blocks) == 1 else np.vstack(blocks)
        out = fn(x)
        if len(out) != len(x):
            raise InternalError(f"the model returned {len(out)} outputs for {len(x)} rows")
        if len(blocks) == 1:
            return [out]
        bounds = np.cumsum([len(b) for b in blocks])[:-1]
        return list(np.split(out, bounds))

    return run


def _floats(values: Any) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):  # NULL elements: NaN, which the tree libraries treat as missing
        return np.asarray(
            [[np.nan if v is None else float(v) for v in row] for row in values]
            if values and isinstance(values[0], (list, tuple))
            else [np.nan if v is None else float(v) for v in values],
            dtype=np.float32,
        )


def _dense(calls: Sequence[Mapping[str, Any]], width: int) -> np.ndarray | None:
    """Every call's features as one matrix in one NumPy conversion (a batch's common case: flat
    arrays of the right width, no NULL, all finite), else None for the per-call path, which
    names what is wrong with which call."""
    try:
        x = np.asarray([c["features"] for c in calls], dtype=np.float32)
    except (TypeError, ValueError):  # NULL elements, text, ragged or nested arrays
        return None
    if x.ndim != 2 or x.shape[1] != width or not np.isfinite(x).all():
        return None
    return x


def _flat(values: Any) -> Any:
    if isinstance(values, list) and values and isinstance(values[0], list):
        return [v for inner in values for v in _flat(inner)]
    return values


def _mismatch(got: int, width: int, flat: bool) -> np.ndarray:
    what = f"a multiple of {width}" if flat else str(width)
    raise InvalidParameterValue(f"the features array has {got} elements but the model expects {what}")


def _check_op(op: str, task: str) -> None:
    fits = {
        "predict_proba": ("classification",),
        "predict_joint": ("regression",),
        "decompose": ("decomposition",),
    }.get(op)
    if fits is not None and task not in fits:
        raise InvalidParameterValue(
            f"{op} needs a {' or '.join(fits)} model; this project's task is {task!r}"
        )


def _shape(op: str, served: Served, out: np.ndarray) -> Any:
    if op == "predict_batch":
        if served.model.task == "classification":
            return [(served.label(float(v)),) for v in out.ravel()]
        return [(float(v),) for v in out.ravel()]
    if op in ("predict_proba", "decompose", "predict_joint"):
        return [float(v) for v in np.asarray(out[0]).ravel()]
    value = np.asarray(out[0]).ravel()
    if value.size != 1:
        raise DataException("this model predicts several values per row: use pgml.predict_joint")
    if served.model.task == "classification":
        return served.label(float(value[0]))
    return float(value[0])
