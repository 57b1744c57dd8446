"""The planner's view of the pgml functions: type OIDs and overload resolution.

The functions themselves (arguments, defaults, result types) are declared once, in
`core.functions`; this module binds a call to one of their overloads by argument count,
names and the statically visible shape of each argument. Functions that need no model
(vector math, metric helpers, ``version()``) are ordinary SQL functions in the upstream's
``pgml`` schema and are not declared: the planner leaves calls to them alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast

from core import functions
from core.errors import SyntaxError_, UndefinedFunction
from core.functions import ANY, REQUIRED, Arg, Signature
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
# The first name of each OID: the type a client-declared parameter of an `any` argument is read as.
OID_TYPES: Mapping[int, str] = {oid: name for name, oid in reversed(list(TYPE_OIDS.items()))}
# The planner sees every declared function (core.functions), shipped or added at run time.
SIGNATURES: tuple[Signature, ...] = tuple(sig for fn in functions.FUNCTIONS for sig in fn.overloads)


def row_type(sig: Signature) -> str:
    """The composite type of one row of a set-returning function, which migration 0006 makes
    (`pgml._chunk_row`): the value such a call has outside FROM."""
    return f"pgml._{sig.name}_row"


def overloads(name: str) -> tuple[Signature, ...]:
    """The overloads of pgml.`name`; () when the proxy does not plan it."""
    fn = functions.declaration(name)
    return () if fn is None else fn.overloads


def is_runtime_call(node: Any) -> bool:
    """True for ``pgml.<name>(...)`` where `name` needs the runtime."""
    names = node.funcname
    return (
        len(names) == 2
        and getattr(names[0], "sval", None) == "pgml"
        and bool(overloads(getattr(names[1], "sval", "")))
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
    sigs = overloads(name)
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
    sigs = "; ".join(s.describe() for s in overloads(name))
    raise UndefinedFunction(
        f"function pgml.{name} does not accept these arguments: {why}", hint=f"available signatures: {sigs}"
    )


__all__ = ["ANY", "REQUIRED", "SIGNATURES", "TYPE_OIDS", "Arg", "BoundCall", "Signature", "bind"]
