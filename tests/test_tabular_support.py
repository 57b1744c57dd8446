"""Shared fixtures of the tabular tests: a private database, a started TabularRuntime, a context.

Imported by the other `test_tabular_*` modules (pytest collects this one too; it holds
no tests). The runtime gets its own database so the `pgml` schema it migrates there does
not meet the other suites' objects in the shared test server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from core.interfaces import CallContext
from runtime.tabular import TabularRuntime
from tests.fix_postgres import PgServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATASETS = ("iris", "breast_cancer", "diabetes", "digits", "linnerud", "wine")


class Notes:
    """A CallContext whose notices are collected for assertions."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ctx = CallContext(notice=self._notice, user="postgres", database="tabular")

    async def _notice(self, text: str) -> None:
        self.lines.append(text)


def new_database(server: PgServer, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    server.psql(f"CREATE DATABASE {name}")
    return server.dsn_for(name)


# The modules that import these fixtures each register their own copy with pytest, and a
# session-scoped fixture is then made once per module: this cache makes it once per session.
_SHARED: dict[str, Any] = {}


@pytest.fixture(scope="session")
def tab_dsn(pg_server: PgServer) -> str:
    if "dsn" not in _SHARED:
        _SHARED["dsn"] = new_database(pg_server, "tabular")
    dsn: str = _SHARED["dsn"]
    return dsn


@pytest.fixture(scope="session")
async def tab(tab_dsn: str) -> AsyncIterator[TabularRuntime]:
    if "runtime" in _SHARED:
        yield _SHARED["runtime"]
        return
    runtime = TabularRuntime(tab_dsn, {"pool_size": 3})
    await runtime.start()
    _SHARED["runtime"] = runtime
    try:
        notes = Notes()
        for name in DATASETS:
            await runtime.call_batch("load_dataset", [{"source": name}], notes.ctx)
        yield runtime
    finally:
        _SHARED.pop("runtime", None)
        await runtime.close()


async def call(
    rt: TabularRuntime, function: str, calls: Sequence[Mapping[str, Any]], notes: Notes | None = None
) -> list[Any]:
    return await rt.call_batch(function, calls, (notes or Notes()).ctx)


async def train(rt: TabularRuntime, notes: Notes | None = None, **args: Any) -> tuple[Any, ...]:
    """One pgml.train call with the reference's defaults; returns its single row."""
    defaults: dict[str, Any] = {
        "task": None,
        "relation_name": None,
        "y_column_name": None,
        "algorithm": "linear",
        "hyperparams": {},
        "search": None,
        "search_params": {},
        "search_args": {},
        "test_size": 0.25,
        "test_sampling": "stratified",
        "runtime": None,
        "automatic_deploy": True,
        "materialize_snapshot": False,
        "preprocess": {},
    }
    joint = args.pop("joint", False)
    rows = await call(rt, "train_joint" if joint else "train", [{**defaults, **args}], notes)
    assert len(rows) == 1 and len(rows[0]) == 1
    row: tuple[Any, ...] = rows[0][0]
    return row
