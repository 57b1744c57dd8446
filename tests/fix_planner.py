"""Helpers for the planner's tests: a deterministic runtime and the reference it implies.

`HistRuntime` is a real function of its inputs (embed = a small character histogram,
predict = the sum of the features, chunk = words, transform = upper-cased inputs), so
tests can check the planner's mechanics — batching, merging, NULLs, ordering, temp
tables — against values computed by calling the same runtime directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from core.errors import InvalidParameterValue, UndefinedModel
from core.interfaces import CallContext

LETTERS = "aeiou"


def hist(text: str) -> list[float]:
    low = text.lower()
    return [float(len(text))] + [float(low.count(c)) for c in LETTERS]


class HistRuntime:
    """Implements core.interfaces.Runtime deterministically; records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []

    async def call_batch(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        self.batches.append((function, len(calls)))
        return [self.one(function, c) for c in calls]

    def call_now(self, function: str, calls: Sequence[Mapping[str, Any]]) -> list[Any] | None:
        return None  # every call through call_batch, which records its batch

    def one(self, function: str, call: Mapping[str, Any]) -> Any:
        if function == "embed":
            if call["transformer"] == "missing":
                raise UndefinedModel('model "missing" not found (looked in the test runtime)')
            if "inputs" in call:
                return [(hist(t),) for t in call["inputs"]]
            scale = float(call["kwargs"].get("scale", 1))
            return [x * scale for x in hist(call["text"])]
        if function in ("predict", "predict_proba"):
            feats = call["features"]
            if isinstance(feats, Mapping):  # a row (t.*): its numeric columns
                feats = [v for v in feats.values() if isinstance(v, int | float)]
            total = float(sum(float(x) for x in feats))
            return total if function == "predict" else [total, -total]
        if function == "chunk":
            return [(i, w) for i, w in enumerate(call["text"].split(), start=1)]
        if function == "transform":
            return [str(x).upper() for x in call["inputs"]]
        if function == "rank":
            docs = call["documents"]
            return sorted(
                ((i, float(len(set(call["query"]) & set(d))), d) for i, d in enumerate(docs)),
                key=lambda r: -r[1],
            )
        if function == "train":
            return [(call["project_name"], call["task"] or "regression", call["algorithm"], True)]
        raise InvalidParameterValue(f"HistRuntime has no {function}")

    async def stream(self, function: str, call: Mapping[str, Any], ctx: CallContext) -> AsyncIterator[Any]:
        for word in str(call.get("input", "")).split():
            yield word
