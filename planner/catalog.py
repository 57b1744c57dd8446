"""The pgml functions that need the runtime: names, arguments, defaults, result types.

Owns the signature table (from ``shared/reference/pgml-api.md``) and overload resolution
by argument count, names and the statically visible shape of each argument. Functions
that need no model (vector math, metric helpers, ``version()``) are ordinary SQL
functions in the upstream's ``pgml`` schema and are deliberately absent here: the
planner leaves calls to them alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pglast import ast

from core.errors import SyntaxError_, UndefinedFunction
from planner.sqltree import is_node

# Type OIDs (pg_type.dat); `vector` has no fixed OID and is looked up upstream.
TYPE_OIDS: Mapping[str, int] = {
    "text": 25,
    "varchar": 1043,
    "jsonb": 3802,
    "json": 114,
    "real": 700,
    "float4": 700,
    "float8": 701,
    "double precision": 701,
    "bigint": 20,
    "int8": 20,
    "int": 23,
    "int4": 23,
    "integer": 23,
    "smallint": 21,
    "int2": 21,
    "bool": 16,
    "boolean": 16,
    "text[]": 1009,
    "varchar[]": 1015,
    "real[]": 1021,
    "float4[]": 1021,
    "float8[]": 1022,
    "double precision[]": 1022,
    "jsonb[]": 3807,
    "int[]": 1007,
    "int4[]": 1007,
    "integer[]": 1007,
    "bigint[]": 1016,
    "int8[]": 1016,
    "smallint[]": 1005,
    "int2[]": 1005,
    "bool[]": 1000,
    "boolean[]": 1000,
    "record": 2249,
    "numeric": 1700,
}
REQUIRED = object()  # marks an argument without a default
ANY = "any"  # an argument whose SQL type varies by overload: sent upstream without a cast


@dataclass(frozen=True)
class Arg:
    name: str
    type: str  # a key of TYPE_OIDS, or ANY
    default: Any = REQUIRED

    def describe(self) -> str:
        if self.default is REQUIRED:
            return f"{self.name} {self.type}"
        return f"{self.name} {self.type} DEFAULT {self.default!r}"


@dataclass(frozen=True)
class Signature:
    name: str
    args: tuple[Arg, ...]
    returns: str  # element type for SETOF scalars; "record" for TABLE(...)
    setof: bool = False
    columns: tuple[tuple[str, str], ...] = ()  # TABLE(...) columns
    strict: bool = True
    # Which overload this is, when one name has several (chosen by `array_arg`).
    array_arg: str | None = None
    key_aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_table(self) -> bool:
        return bool(self.columns)

    def out_columns(self) -> tuple[tuple[str, str], ...]:
        return self.columns if self.columns else ((self.name, self.returns),)

    def describe(self) -> str:
        ret = (
            f"TABLE({', '.join(f'{n} {t}' for n, t in self.columns)})"
            if self.columns
            else ("SETOF " if self.setof else "") + self.returns
        )
        return f"pgml.{self.name}({', '.join(a.describe() for a in self.args)}) RETURNS {ret}"


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
_PREDICT = (Arg("project_name", ANY), Arg("features", ANY))

SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "transform",
        (Arg("task", ANY), Arg("args", "jsonb", {}), Arg("inputs", ANY, []), Arg("cache", "bool", False)),
        "jsonb",
    ),
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
    Signature(
        "embed", (Arg("transformer", "text"), Arg("text", "text"), Arg("kwargs", "jsonb", {})), "real[]"
    ),
    Signature(
        "embed",
        (Arg("transformer", "text"), Arg("inputs", "text[]"), Arg("kwargs", "jsonb", {})),
        "real[]",
        setof=True,
        array_arg="inputs",
    ),
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
    Signature(
        "chunk",
        (Arg("splitter", "text"), Arg("text", "text"), Arg("kwargs", "jsonb", {})),
        "record",
        setof=True,
        columns=(("chunk_index", "bigint"), ("chunk", "text")),
    ),
    Signature("train", _train_args("text"), "record", setof=True, columns=_TRAIN_COLS, strict=False),
    Signature("train_joint", _train_args("text[]"), "record", setof=True, columns=_TRAIN_COLS, strict=False),
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
    Signature("predict", _PREDICT, "real"),
    Signature("predict_proba", _PREDICT, "real[]"),
    Signature("predict_joint", _PREDICT, "real[]"),
    Signature("predict_batch", _PREDICT, "real", setof=True),
    Signature("decompose", _PREDICT, "real[]"),
    Signature(
        "deploy", (Arg("model_id", "bigint"),), "record", setof=True, columns=_DEPLOY_COLS, strict=False
    ),
    Signature(
        "deploy",
        (Arg("project_name", "text"), Arg("strategy", "text"), Arg("algorithm", "text", None)),
        "record",
        setof=True,
        columns=_DEPLOY_COLS,
        strict=False,
    ),
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
    Signature(
        "generate", (Arg("project_name", "text"), Arg("inputs", "text"), Arg("config", "jsonb", {})), "text"
    ),
    Signature(
        "generate",
        (Arg("project_name", "text"), Arg("inputs", "text[]"), Arg("config", "jsonb", {})),
        "text[]",
        array_arg="inputs",
    ),
)
BY_NAME: dict[str, list[Signature]] = {}
for _sig in SIGNATURES:
    BY_NAME.setdefault(_sig.name, []).append(_sig)


def is_runtime_call(node: Any) -> bool:
    """True for ``pgml.<name>(...)`` where `name` needs the runtime."""
    names = node.funcname
    return (
        len(names) == 2
        and getattr(names[0], "sval", None) == "pgml"
        and getattr(names[1], "sval", None) in BY_NAME
    )


@dataclass
class BoundCall:
    """One pgml call with its overload chosen and its arguments keyed by name."""

    sig: Signature
    args: dict[str, Any]  # given arguments only; defaults come from sig

    def defaults(self) -> dict[str, Any]:
        return {a.name: a.default for a in self.sig.args if a.name not in self.args}


def looks_like_array(node: Any, param_oids: Sequence[int]) -> bool:
    """Whether an argument is visibly an array (ARRAY[...], ::type[], or a $n declared as an array)."""
    if is_node(node, ast.A_ArrayExpr):
        return True
    if is_node(node, ast.TypeCast) and node.typeName is not None:
        return bool(node.typeName.arrayBounds)
    if is_node(node, ast.ParamRef) and 0 < node.number <= len(param_oids):
        return param_oids[node.number - 1] in _ARRAY_OIDS
    if is_node(node, ast.A_Const) and not node.isnull and is_node(node.val, ast.String):
        return False
    return False


_ARRAY_OIDS = frozenset(oid for name, oid in TYPE_OIDS.items() if name.endswith("[]"))


def bind(node: Any, param_oids: Sequence[int] = ()) -> BoundCall:
    """Choose the overload of a ``pgml.*`` call and key its arguments by name.

    Raises UndefinedFunction (42883) with the signatures as hint when nothing matches.
    """
    name = node.funcname[1].sval
    positional: list[Any] = []
    named: dict[str, Any] = {}
    for arg in node.args or ():
        if is_node(arg, ast.NamedArgExpr):
            if arg.name in named:
                # Postgres's own words and SQLSTATE for these call forms (parse_func.c).
                raise SyntaxError_(f'argument name "{arg.name}" used more than once')
            named[arg.name] = arg.arg
        else:
            if named:
                raise SyntaxError_(
                    "positional argument cannot follow named argument",
                    hint=f"in the call of pgml.{name}, put the positional arguments before the named ones",
                )
            positional.append(arg)
    if node.agg_star or node.agg_distinct or node.over is not None or node.agg_order or node.func_variadic:
        _no_match(name, "pgml functions are not aggregates or window functions")
    errors: list[str] = []
    sigs = BY_NAME[name]
    # Array overloads first: they win when the argument is visibly an array, or when
    # no scalar overload binds (e.g. `inputs => col`).
    for sig in sorted(sigs, key=lambda s: s.array_arg is None):
        bound = _try_bind(sig, positional, named, errors)
        if bound is None:
            continue
        if sig.array_arg is not None and not looks_like_array(bound.args[sig.array_arg], param_oids):
            scalar = [o for o in sigs if o.array_arg is None]
            if any(_try_bind(o, positional, named, []) is not None for o in scalar):
                continue
        return bound
    _no_match(name, errors[0] if errors else "no overload matches the given arguments")
    raise AssertionError  # unreachable


def _try_bind(
    sig: Signature, positional: list[Any], named: dict[str, Any], errors: list[str]
) -> BoundCall | None:
    if len(positional) > len(sig.args):
        errors.append(f"too many arguments ({len(positional)} given, at most {len(sig.args)})")
        return None
    args = {sig.args[i].name: node for i, node in enumerate(positional)}
    names = {a.name for a in sig.args}
    for key, node in named.items():
        if key not in names:
            errors.append(f'no argument named "{key}"')
            return None
        if key in args:
            errors.append(f'argument "{key}" given twice')
            return None
        args[key] = node
    missing = [a.name for a in sig.args if a.default is REQUIRED and a.name not in args]
    if missing:
        errors.append(f'missing argument "{missing[0]}"')
        return None
    return BoundCall(sig, args)


def _no_match(name: str, why: str) -> None:
    sigs = "; ".join(s.describe() for s in BY_NAME[name])
    raise UndefinedFunction(
        f"function pgml.{name} does not accept these arguments: {why}", hint=f"available signatures: {sigs}"
    )


def runtime_keys(sig: Signature, values: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping the runtime gets: predict-like functions take `model_id` for an integer first argument."""
    out = dict(values)
    if sig.args and sig.args[0].name == "project_name" and sig.args[0].type == ANY:
        if isinstance(out.get("project_name"), int) and not isinstance(out.get("project_name"), bool):
            out["model_id"] = out.pop("project_name")
    if sig.name in ("predict", "predict_proba", "predict_joint", "predict_batch", "decompose"):
        if isinstance(out.get("features"), dict):
            out["row"] = out.pop("features")
    return out
