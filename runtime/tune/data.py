"""The rows of a `pgml.tune` relation: read, checked, labelled and split as `pgml.train` splits.

Reads on the runtime's own connection after checking that the client's role may read
the relation (the tabular registry's check). Labels may be text or integers; their
order is sorted (numerically for integers), so label ids are the same in every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InvalidParameterValue, NullValueNotAllowed
from runtime.tabular import registry, training

from .args import TuneArgs


@dataclass
class Split:
    """The relation's rows as the training process gets them, plus what the snapshot records."""

    train: dict[str, list[Any]]
    test: dict[str, list[Any]]
    labels: list[str]  # class names in id order; empty for conversation
    columns: list[dict[str, Any]]
    rows: int


async def read(pool: registry.Pool, args: TuneArgs, user: str) -> Split:
    """Read `args.relation`; raises 42P01, 42501, 22023 (missing column, empty split) or 22004."""
    async with pool.connection() as conn:
        columns = await registry.relation_columns(conn, args.relation)
        await registry.check_can_read(conn, args.relation, user)
        types = dict(columns)
        wanted = list(dict.fromkeys(args.columns.values()))
        missing = [c for c in wanted if c not in types]
        if missing:
            raise InvalidParameterValue(
                f"pgml.tune: column {missing[0]!r} is not in relation {args.relation!r}",
                hint=f"columns: {', '.join(types)}; name yours in hyperparams.dataset_args",
            )
        label_col = args.columns.get("class_column")
        kinds = [(c, "numeric" if c == label_col and _is_number(types[c]) else "text") for c in wanted]
        data, n = await registry.read_columns(conn, args.relation, kinds)
    for name, kind in kinds:
        values = data[name]
        nulls = int(np.sum(np.isnan(values))) if kind == "numeric" else sum(v is None for v in values)
        if nulls and not (args.task == "conversation" and name == args.columns.get("system_column")):
            raise NullValueNotAllowed(
                f"pgml.tune: column {name!r} of {args.relation!r} has {nulls} NULL values",
                hint="filter them out with a view",
            )
    return _split(args, data, n, types)


def _is_number(pg_type: str) -> bool:
    return pg_type in ("smallint", "integer", "bigint")


def _split(args: TuneArgs, data: dict[str, Any], n: int, types: dict[str, str]) -> Split:
    if n < 2:
        raise InvalidParameterValue(
            f"pgml.tune: relation {args.relation!r} has {n} rows; tuning needs at least 2"
            " (rows to train on and rows to evaluate on)"
        )
    label_col = args.columns.get("class_column")
    y: np.ndarray | None = None
    labels: list[str] = []
    if label_col is not None:
        raw = data[label_col]
        classes, y = np.unique(
            raw.astype(np.int64) if raw.dtype != object else raw.astype(str), return_inverse=True
        )
        labels = [str(c) for c in classes.tolist()]
        if len(labels) < 2:
            raise InvalidParameterValue(
                f"pgml.tune: column {label_col!r} has {len(labels)} distinct label(s);"
                " classification needs at least 2"
            )
    train_idx, test_idx = training.split(n, y, args.test_size, args.sampling, y is not None, seed=0)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise InvalidParameterValue(
            f"pgml.tune: relation {args.relation!r} has {n} rows, which leaves "
            f"{len(train_idx)} for training and {len(test_idx)} for evaluation",
            hint="both splits need rows: add rows or change test_size",
        )
    if y is not None:
        unseen = sorted(set(y[test_idx].tolist()) - set(y[train_idx].tolist()))
        if unseen:
            raise InvalidParameterValue(
                f"pgml.tune: label(s) {', '.join(repr(labels[i]) for i in unseen)}"
                " occur only in the test split",
                hint="add rows of that class, or use test_sampling => 'stratified'",
            )
    roles = {key.removesuffix("_column"): col for key, col in args.columns.items()}

    def part(idx: np.ndarray) -> dict[str, list[Any]]:
        out = {role: [data[col][i] for i in idx] for role, col in roles.items() if role != "class"}
        if y is not None:
            out["label"] = [int(v) for v in y[idx]]
        return out

    columns = [{"name": c, "pg_type": types[c], "role": role} for role, c in roles.items()]
    return Split(part(train_idx), part(test_idx), labels, columns, n)
