"""The function declarations (core/functions.py) against what serves and documents them.

Every declared function has its `serve_<method>` on the runtime it names, and every such
method is declared; the planner's catalog, the tabular runtime's list and the docs table
are what the declarations say; and a toy function, declared in the test and served by one
method of a Runtime subclass, is called through the real proxy and planner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
import pytest

from core import functions
from core.errors import FeatureNotSupported
from core.functions import Arg, Function, NotSupported, Served, Signature
from core.interfaces import CallContext
from planner import build_handler
from planner.catalog import SIGNATURES
from runtime import Runtime
from runtime.tabular import TabularRuntime
from runtime.tabular.predictor import OPS
from runtime.tune import TuneRuntime
from tools import gen_sql_docs

RUNTIMES: dict[str, type] = {"models": Runtime, "tabular": TabularRuntime, "tune": TuneRuntime}


def _methods(klass: type) -> set[str]:
    return {name.removeprefix("serve_") for name in dir(klass) if name.startswith("serve_")}


@pytest.mark.parametrize("side", sorted(RUNTIMES))
def test_every_declared_function_is_served_and_every_served_one_declared(side: str) -> None:
    declared = {
        f.serve.method for f in functions.FUNCTIONS if isinstance(f.serve, Served) and f.serve.runtime == side
    }
    served = _methods(RUNTIMES[side])
    assert declared - served == set(), f"declared but not served by {RUNTIMES[side].__name__}"
    assert served - declared == set(), f"served by {RUNTIMES[side].__name__} but not declared"


def test_names_are_unique_and_overloads_named_after_their_function() -> None:
    names = [f.name for f in functions.FUNCTIONS]
    assert len(names) == len(set(names))
    for fn in functions.FUNCTIONS:
        assert fn.overloads and all(s.name == fn.name for s in fn.overloads)
        # Overloads differ by their argument names or by which argument is an array.
        keys = [(tuple(a.name for a in s.args), s.array_arg) for s in fn.overloads]
        assert len(set(keys)) == len(keys)


def test_derived_lists_are_the_declarations() -> None:
    assert SIGNATURES == tuple(s for f in functions.FUNCTIONS for s in f.overloads)
    assert TabularRuntime.functions == {
        f.name for f in functions.FUNCTIONS if isinstance(f.serve, Served) and f.serve.runtime == "tabular"
    }
    assert OPS == {"predict", "predict_proba", "predict_joint", "predict_batch", "decompose"}


async def _quiet(_: str) -> None:
    return None


def test_not_supported_functions_answer_0A000_with_their_hint() -> None:
    rt = Runtime({}, "")
    try:
        for fn in functions.FUNCTIONS:
            if not isinstance(fn.serve, NotSupported):
                continue
            with pytest.raises(FeatureNotSupported) as info:
                asyncio.run(rt.call_batch(fn.name, [{}], CallContext(notice=_quiet)))
            assert info.value.fields["C"] == "0A000" and info.value.fields["H"] == fn.serve.hint
    finally:
        asyncio.run(rt.close())


def test_docs_table_is_current() -> None:
    current = gen_sql_docs.TARGET.read_text()
    assert gen_sql_docs.render(current) == current, "run `python -m tools.gen_sql_docs`"


# --- a toy function: one declaration, one runtime method -----------------------------------------
TOY = Function(
    "toy_repeat",
    (Signature("toy_repeat", (Arg("text", "text"), Arg("times", "int", 2)), "text"),),
    Served("models", "toy_repeat"),
    "the text repeated (a test's toy)",
    deterministic=True,
)


class ToyRuntime(Runtime):
    def __init__(self) -> None:
        super().__init__({}, "")
        self.seen: list[int] = []

    async def serve_toy_repeat(
        self, function: str, calls: Sequence[Mapping[str, Any]], ctx: CallContext
    ) -> list[Any]:
        self.seen.append(len(calls))
        return [str(c["text"]) * int(c["times"]) for c in calls]


@pytest.fixture(scope="module")
def toy(inprocess_proxy_factory: Callable[..., Any]) -> Iterator[tuple[str, ToyRuntime]]:
    functions.register(TOY)
    rt = ToyRuntime()
    try:
        proxy = inprocess_proxy_factory(build_handler(rt, {"chunk_rows": 2}))
        yield proxy.dsn(), rt
    finally:
        functions.unregister(TOY.name)
        asyncio.run(rt.close())


def test_a_toy_function_runs_through_the_planner(toy: tuple[str, ToyRuntime]) -> None:
    dsn, rt = toy
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pgml.toy_repeat('ab')").fetchone() == ("abab",)
        assert conn.execute("SELECT pgml.toy_repeat(%s, times => 3)", ("x",)).fetchone() == ("xxx",)
        rows = conn.execute(
            "SELECT v, pgml.toy_repeat(v) FROM (VALUES ('a'), ('b'), (NULL), ('c')) t(v) ORDER BY v"
        ).fetchall()
        assert rows == [("a", "aa"), ("b", "bb"), ("c", "cc"), (None, None)]
        with pytest.raises(psycopg.errors.UndefinedFunction) as info:
            conn.execute("SELECT pgml.toy_repeat('a', nope => 1)")
        assert "toy_repeat(text text, times int DEFAULT 2)" in (info.value.diag.message_hint or "")
    assert max(rt.seen) == 2  # the row-dependent call ran in the planner's chunks, not per row
