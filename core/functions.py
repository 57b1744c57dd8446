"""Every pgml function the proxy plans: one declaration each, the single source of truth.

A `Function` says, for one SQL name: its overloads (arguments with their SQL types and
defaults, the result shape), its flags (deterministic, writes, streams; a set-returning
result is the overload's `setof`) and the runtime entry that serves it. Everything else is
derived from `FUNCTIONS`: the planner's catalog and overload resolution (planner/catalog.py),
the runtime's dispatch and its not-supported answers (runtime/facade.py), the tabular
runtime's function list and its predict operations, the planner's choice of which identical
calls may share one evaluation, and the SQL reference table in docs/sql.md
(`python -m tools.gen_sql_docs`).

Arguments reach the runtime under these SQL names, as a mapping name -> Python value.

To add a function:
1. append one `Function(...)` below (its overloads, flags and `Served("models", "x")`);
2. give that runtime a method `serve_x(self, function, calls, ctx) -> list` (runtime/facade.py
   for "models", runtime/tabular/runtime.py for "tabular"): one result per call;
3. run `python -m tools.gen_sql_docs` to refresh docs/sql.md.
tests/test_functions.py fails while a declaration has no method or a method no declaration.
A function the proxy knows but does not run is declared with `NotSupported(hint)`.

Functions that need no model (vector math, `pgml.version()`) are ordinary SQL functions in
the upstream's `pgml` schema (runtime/sql/) and are not declared here: the planner leaves
them alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()  # no default
ANY = "any"  # an argument whose SQL type varies by call: sent upstream without a cast


@dataclass(frozen=True)
class Arg:
    name: str
    type: str  # a SQL type name (planner.catalog.TYPE_OIDS has its OID), or ANY
    default: Any = REQUIRED

    def describe(self) -> str:
        if self.default is REQUIRED:
            return f"{self.name} {self.type}"
        return f"{self.name} {self.type} DEFAULT {_sql_literal(self.default)}"


def _sql_literal(value: Any) -> str:
    """A default as SQL writes it: NULL, true, 0.25, 'text', '{}' (a jsonb or array literal)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict | list):
        return "'{}'" if not value else "'" + json.dumps(value).replace("'", "''") + "'"
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class Signature:
    """One overload of a function: what the planner binds a call against."""

    name: str
    args: tuple[Arg, ...]
    returns: str  # element type for SETOF scalars; "record" for TABLE(...)
    setof: bool = False
    columns: tuple[tuple[str, str], ...] = ()  # TABLE(...) columns
    strict: bool = True  # NULL in any argument gives NULL without a call
    # Which overload this is, when one name has several (chosen by `array_arg` being an array).
    array_arg: str | None = None

    @property
    def is_table(self) -> bool:
        return bool(self.columns)

    def out_columns(self) -> tuple[tuple[str, str], ...]:
        return self.columns if self.columns else ((self.name, self.returns),)

    def result(self) -> str:
        if self.columns:
            return f"TABLE({', '.join(f'{n} {t}' for n, t in self.columns)})"
        return ("SETOF " if self.setof else "") + self.returns

    def describe(self) -> str:
        return f"pgml.{self.name}({', '.join(a.describe() for a in self.args)}) RETURNS {self.result()}"


@dataclass(frozen=True)
class Served:
    """The runtime method that serves a function: `serve_<method>` on that runtime."""

    # runtime.Runtime, runtime.tabular.TabularRuntime, or runtime.tune.TuneRuntime
    runtime: Literal["models", "tabular", "tune"]
    method: str


@dataclass(frozen=True)
class NotSupported:
    """A function of the extension the proxy does not run: 0A000 with this hint."""

    hint: str


@dataclass(frozen=True)
class Function:
    name: str
    overloads: tuple[Signature, ...]
    serve: Served | NotSupported
    summary: str  # one line for the SQL reference
    deterministic: bool = False  # identical calls in one statement may share one evaluation
    writes: bool = False  # changes the `pgml` schema or creates tables (a replica cannot run it)
    streams: bool = False  # the runtime yields its rows as they are made (Runtime.stream)

    @property
    def returns_set(self) -> bool:
        return any(s.setof for s in self.overloads)


def _train_args(y_type: str) -> tuple[Arg, ...]:
    return (
        Arg("project_name", "text"),
        Arg("task", "text", None),
        Arg("relation_name", "text", None),
        Arg("y_column_name", y_type, None),
        Arg("algorithm", "text", "linear"),
        Arg("hyperparams", "jsonb", {}),
        Arg("search", "text", None),
        Arg("search_params", "jsonb", {}),
        Arg("search_args", "jsonb", {}),
        Arg("test_size", "real", 0.25),
        Arg("test_sampling", "text", "stratified"),
        Arg("runtime", "text", None),
        Arg("automatic_deploy", "bool", True),
        Arg("materialize_snapshot", "bool", False),
        Arg("preprocess", "jsonb", {}),
    )


_TRAIN_COLS = (("project", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool"))
_DEPLOY_COLS = (("project", "text"), ("strategy", "text"), ("algorithm", "text"))
# project_name is text (a project: its deployed model) or bigint (a model id); features is
# real[] (the feature values in order) or a row (`t.*`, ROW(...): columns by name).
_PREDICT = (Arg("project_name", ANY), Arg("features", ANY))


def _predict(name: str, returns: str, summary: str, setof: bool = False) -> Function:
    return Function(
        name,
        (Signature(name, _PREDICT, returns, setof=setof),),
        Served("tabular", "predict"),
        summary,
        deterministic=True,
    )


def _train(name: str, y_type: str, summary: str) -> Function:
    sig = Signature(name, _train_args(y_type), "record", setof=True, columns=_TRAIN_COLS, strict=False)
    return Function(name, (sig,), Served("tabular", "train"), summary, writes=True)


FUNCTIONS: tuple[Function, ...] = (
    Function(
        "transform",
        (
            Signature(
                "transform",
                (
                    Arg("task", ANY),
                    Arg("args", "jsonb", {}),
                    Arg("inputs", ANY, []),
                    Arg("cache", "bool", False),
                ),
                "jsonb",
            ),
        ),
        Served("models", "transform"),
        "a Hugging Face pipeline task over the inputs (generation may sample: never shared)",
    ),
    Function(
        "transform_stream",
        (
            Signature(
                "transform_stream",
                (Arg("task", ANY), Arg("args", "jsonb", {}), Arg("input", "text", "")),
                "jsonb",
                setof=True,
            ),
            Signature(
                "transform_stream",
                (Arg("task", ANY), Arg("args", "jsonb", {}), Arg("inputs", ANY)),
                "jsonb",
                setof=True,
                array_arg="inputs",
            ),
        ),
        Served("models", "transform_stream"),
        "text generation, one row per piece as it is generated",
        streams=True,
    ),
    Function(
        "embed",
        (
            Signature(
                "embed",
                (Arg("transformer", "text"), Arg("text", "text"), Arg("kwargs", "jsonb", {})),
                "real[]",
            ),
            Signature(
                "embed",
                (Arg("transformer", "text"), Arg("inputs", "text[]"), Arg("kwargs", "jsonb", {})),
                "real[]",
                setof=True,
                array_arg="inputs",
            ),
        ),
        Served("models", "embed"),
        "a sentence embedding per text",
        deterministic=True,
    ),
    Function(
        "rank",
        (
            Signature(
                "rank",
                (
                    Arg("transformer", "text"),
                    Arg("query", "text"),
                    Arg("documents", "text[]"),
                    Arg("kwargs", "jsonb", {}),
                ),
                "record",
                setof=True,
                columns=(("corpus_id", "bigint"), ("score", "float8"), ("text", "text")),
            ),
        ),
        Served("models", "rank"),
        "cross-encoder scores of the documents against the query, best first",
        deterministic=True,
    ),
    Function(
        "chunk",
        (
            Signature(
                "chunk",
                (Arg("splitter", "text"), Arg("text", "text"), Arg("kwargs", "jsonb", {})),
                "record",
                setof=True,
                columns=(("chunk_index", "bigint"), ("chunk", "text")),
            ),
        ),
        Served("models", "chunk"),
        "a text split into pieces by a LangChain-style splitter",
        deterministic=True,
    ),
    _train("train", "text", "train a model on a relation, store it, deploy it when it is the best"),
    _train("train_joint", "text[]", "train one model for several label columns"),
    Function(
        "snapshot",
        (
            Signature(
                "snapshot",
                (
                    Arg("relation_name", "text"),
                    Arg("y_column_name", ANY),
                    Arg("test_size", "real", 0.25),
                    Arg("test_sampling", "text", "stratified"),
                    Arg("preprocess", "jsonb", {}),
                ),
                "record",
                setof=True,
                columns=(("relation", "text"), ("y_column_name", "text")),
                strict=False,
            ),
        ),
        Served("tabular", "snapshot"),
        "record a relation's split for later training",
        writes=True,
    ),
    _predict("predict", "real", "the deployed (or given) model's prediction for one row"),
    _predict("predict_proba", "real[]", "class probabilities for one row"),
    _predict("predict_joint", "real[]", "one prediction per label of a joint model"),
    _predict("predict_batch", "real", "predictions for many rows given as one flat array", setof=True),
    _predict("decompose", "real[]", "the components of a decomposition model for one row"),
    Function(
        "deploy",
        (
            Signature(
                "deploy",
                (Arg("model_id", "bigint"),),
                "record",
                setof=True,
                columns=_DEPLOY_COLS,
                strict=False,
            ),
            Signature(
                "deploy",
                (Arg("project_name", "text"), Arg("strategy", "text"), Arg("algorithm", "text", None)),
                "record",
                setof=True,
                columns=_DEPLOY_COLS,
                strict=False,
            ),
        ),
        Served("tabular", "deploy"),
        "make a model the project's deployed one (by id, or by a strategy)",
        writes=True,
    ),
    Function(
        "load_dataset",
        (
            Signature(
                "load_dataset",
                (
                    Arg("source", "text"),
                    Arg("subset", "text", None),
                    Arg("limit", "bigint", None),
                    Arg("kwargs", "jsonb", {}),
                ),
                "record",
                setof=True,
                columns=(("table_name", "text"), ("rows", "bigint")),
                strict=False,
            ),
        ),
        Served("tabular", "load_dataset"),
        "create and fill pgml.<name> from a built-in, offline or Hugging Face hub dataset",
        writes=True,
    ),
    Function(
        "tune",
        (
            Signature(
                "tune",
                (
                    Arg("project_name", "text"),
                    Arg("task", "text", None),
                    Arg("relation_name", "text", None),
                    Arg("y_column_name", "text", None),
                    Arg("model_name", "text", None),
                    Arg("hyperparams", "jsonb", {}),
                    Arg("test_size", "real", 0.25),
                    Arg("test_sampling", "text", "stratified"),
                    Arg("automatic_deploy", "bool", True),
                    Arg("materialize_snapshot", "bool", False),
                ),
                "record",
                setof=True,
                columns=(("status", "text"), ("task", "text"), ("algorithm", "text"), ("deployed", "bool")),
                strict=False,
            ),
        ),
        Served("tune", "tune"),
        "fine-tune a language model",
        writes=True,
    ),
    # The extension's utility functions that describe the Python the models run in (the proxy's).
    Function(
        "python_version",
        (Signature("python_version", (), "text"),),
        Served("models", "utility"),
        "the version of the Python the models run in (the proxy's)",
    ),
    Function(
        "python_package_version",
        (Signature("python_package_version", (Arg("name", "text"),), "text"),),
        Served("models", "utility"),
        "the installed version of a Python package in the proxy's environment",
    ),
    Function(
        "python_pip_freeze",
        (Signature("python_pip_freeze", (), "record", setof=True, columns=(("package", "text"),)),),
        Served("models", "utility"),
        "every installed Python package as name==version",
    ),
    Function(
        "validate_python_dependencies",
        (Signature("validate_python_dependencies", (), "bool"),),
        Served("models", "utility"),
        "true when every package the runtime needs is installed, else 58000 naming the missing",
    ),
    Function(
        "clear_gpu_cache",
        (Signature("clear_gpu_cache", (Arg("memory_usage", "real", None),), "bool", strict=False),),
        Served("models", "utility"),
        "free torch's cached CUDA memory; false where there is no GPU",
    ),
    Function(
        "proxy_version",
        (Signature("proxy_version", (), "text"),),
        Served("models", "utility"),
        "the proxy's own version (pgml.version() gives the extension version it matches)",
    ),
    Function(
        "generate",
        (
            Signature(
                "generate",
                (Arg("project_name", "text"), Arg("inputs", "text"), Arg("config", "jsonb", {})),
                "text",
            ),
            Signature(
                "generate",
                (Arg("project_name", "text"), Arg("inputs", "text[]"), Arg("config", "jsonb", {})),
                "text[]",
                array_arg="inputs",
            ),
        ),
        Served("tune", "generate"),
        "text from a model made by pgml.tune",
    ),
)

# Functions added at run time (a test's toy function); the shipped ones are FUNCTIONS.
_EXTRA: dict[str, Function] = {}


def declared() -> Iterator[Function]:
    yield from FUNCTIONS
    yield from _EXTRA.values()


def declaration(name: str) -> Function | None:
    """The declaration of pgml.`name`, or None when the proxy does not plan it."""
    for fn in FUNCTIONS:
        if fn.name == name:
            return fn
    return _EXTRA.get(name)


def register(fn: Function) -> None:
    """Declare one more function at run time (tests); `unregister` removes it."""
    if declaration(fn.name) is not None:
        raise ValueError(f"pgml.{fn.name} is already declared")
    _EXTRA[fn.name] = fn


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def served_by(runtime: str, method: str | None = None) -> frozenset[str]:
    """Names of the shipped functions served by `runtime` (and `method`, when given)."""
    return frozenset(
        f.name
        for f in FUNCTIONS
        if isinstance(f.serve, Served)
        and f.serve.runtime == runtime
        and (method is None or f.serve.method == method)
    )
