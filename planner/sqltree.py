"""Small helpers over pglast's AST: walking with parent paths, building nodes, deparsing.

Owns nothing about pgml itself; `analyze` uses these to find calls and rewrite
statements. Every rewrite builds nodes here and deparses them: no SQL text is pasted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pglast import ast
from pglast.enums import BoolExprType, JoinType, SubLinkType
from pglast.stream import RawStream

# Aggregates whose presence in an argument means it is evaluated per group, not per row.
AGGREGATES = frozenset(
    {
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "string_agg",
        "array_agg",
        "json_agg",
        "jsonb_agg",
        "json_object_agg",
        "jsonb_object_agg",
        "bool_and",
        "bool_or",
        "every",
        "bit_and",
        "bit_or",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "variance",
        "var_pop",
        "var_samp",
        "xmlagg",
        "percentile_cont",
        "percentile_disc",
        "mode",
        "corr",
        "covar_pop",
        "covar_samp",
    }
)


@dataclass(frozen=True)
class Step:
    """One edge of a path from the statement down to a node."""

    parent: Any
    attr: str
    index: int | None  # position in a tuple-valued attribute, or None


Path = tuple[Step, ...]


# The statements whose clauses scope a pgml call (its rows come from their FROM).
STATEMENT_LEVELS = (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt, ast.InsertStmt)


def level_index(path: Path) -> int:
    """The index in `path` of the innermost statement level holding the node."""
    return next(i for i in range(len(path) - 1, -1, -1) if isinstance(path[i].parent, STATEMENT_LEVELS))


def is_node(obj: object, cls: Any) -> bool:
    """isinstance without narrowing: pglast types every attribute Optional, and the planner
    reads nodes whose shape the parser guarantees, so node variables stay `Any`."""
    return isinstance(obj, cls)


def children(node: Any) -> Iterator[tuple[str, int | None, Any]]:
    for attr in node:  # pglast nodes iterate over their slot names
        value = getattr(node, attr)
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                yield attr, i, item
        else:
            yield attr, None, value


def walk(node: Any, path: Path = ()) -> Iterator[tuple[Any, Path]]:
    """Every node below `node` (pre-order) with the path leading to it."""
    if isinstance(node, tuple):
        for item in node:
            yield from walk(item, path)
        return
    if not is_node(node, ast.Node):
        return
    yield node, path
    for attr, index, value in children(node):
        if isinstance(value, tuple):  # lists of lists (RangeFunction.functions)
            for j, item in enumerate(value):
                yield from walk(item, (*path, Step(node, attr, index), Step(node, f"{attr}.{index}", j)))
        elif is_node(value, ast.Node):
            yield from walk(value, (*path, Step(node, attr, index)))


def replace(step: Step, new: Any) -> None:
    """Put `new` where the path step points."""
    if "." in step.attr:  # an item of a list of lists (VALUES rows, RangeFunction.functions)
        base, outer_index = step.attr.rsplit(".", 1)
        outer = list(getattr(step.parent, base))
        inner = list(outer[int(outer_index)])
        inner[step.index or 0] = new
        outer[int(outer_index)] = tuple(inner)
        setattr(step.parent, base, tuple(outer))
        return
    value = getattr(step.parent, step.attr)
    if step.index is None:
        setattr(step.parent, step.attr, new)
    else:
        items = list(value)
        items[step.index] = new
        setattr(step.parent, step.attr, tuple(items))


def contains(node: Any, pred: Callable[[Any], bool]) -> bool:
    return any(pred(n) for n, _ in walk(node))


def deparse(node: Any) -> str:
    return str(RawStream()(node))


# --- node builders -----------------------------------------------------------------------------
def s(value: str) -> Any:
    return ast.String(sval=value)


def type_name(sql_type: str) -> Any:
    """A TypeName for `text`, `real[]`, `jsonb`, `vector`... (schema-qualified for built-ins)."""
    array = sql_type.endswith("[]")
    base = sql_type[:-2] if array else sql_type
    canon = {
        "real": "float4",
        "bigint": "int8",
        "boolean": "bool",
        "double precision": "float8",
        "integer": "int4",
        "int": "int4",
        "smallint": "int2",
    }.get(base, base)
    builtin = canon in {
        "float4",
        "float8",
        "int8",
        "int4",
        "int2",
        "bool",
        "text",
        "jsonb",
        "json",
        "varchar",
        "numeric",
        "record",
    }
    names = (s("pg_catalog"), s(canon)) if builtin else tuple(s(part) for part in canon.split("."))
    bounds = (ast.Integer(ival=-1),) if array else None
    return ast.TypeName(names=names, arrayBounds=bounds, typemod=-1)


def cast(node: Any, sql_type: str) -> Any:
    return ast.TypeCast(arg=node, typeName=type_name(sql_type))


def null_of(sql_type: str) -> Any:
    return cast(ast.A_Const(isnull=True), sql_type)


def param(number: int) -> Any:
    return ast.ParamRef(number=number)


def col(*names: str) -> Any:
    return ast.ColumnRef(fields=tuple(s(n) for n in names))


def func(name: str, *args: Any, schema: str | None = None) -> Any:
    names = (s(schema), s(name)) if schema else (s(name),)
    return ast.FuncCall(funcname=names, args=args or None)


def target(val: Any, name: str | None = None) -> Any:
    return ast.ResTarget(name=name, val=val)


def rangevar(name: str, alias: str | None = None, temp: bool = True) -> Any:
    return ast.RangeVar(
        schemaname="pg_temp" if temp else None,
        relname=name,
        inh=True,
        relpersistence="p",
        alias=ast.Alias(aliasname=alias) if alias else None,
    )


def eq(left: Any, right: Any) -> Any:
    return ast.A_Expr(kind=0, name=(s("="),), lexpr=left, rexpr=right)


def and_(items: list[Any]) -> Any | None:
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    return ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=tuple(items))


def true() -> Any:
    return ast.A_Const(val=ast.Boolean(boolval=True))


def conjuncts(node: Any | None) -> list[Any]:
    if node is None:
        return []
    if is_node(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
        return [c for arg in node.args for c in conjuncts(arg)]
    return [node]


def inner_join(left: Any, right: Any, quals: Any) -> Any:
    return ast.JoinExpr(jointype=JoinType.JOIN_INNER, isNatural=False, larg=left, rarg=right, quals=quals)


def scalar_subquery(select: Any) -> Any:
    return ast.SubLink(subLinkType=SubLinkType.EXPR_SUBLINK, subLinkId=0, subselect=select)


def select(
    targets: list[Any],
    from_: list[Any] | None = None,
    where: Any | None = None,
    **extra: Any,
) -> Any:
    return ast.SelectStmt(
        targetList=tuple(targets),
        fromClause=tuple(from_) if from_ else None,
        whereClause=where,
        op=0,
        all=False,
        **extra,
    )


# --- predicates --------------------------------------------------------------------------------
def is_aggregate(node: Any) -> bool:
    if not is_node(node, ast.FuncCall):
        return False
    name = node.funcname[-1].sval
    return (
        node.agg_star
        or node.agg_distinct
        or node.agg_order is not None
        or node.agg_filter is not None
        or (name in AGGREGATES and node.over is None)
    )


def is_window(node: Any) -> bool:
    return is_node(node, ast.FuncCall) and node.over is not None


def row_dependent(node: Any) -> bool:
    """Whether an expression may differ from row to row (it names a column anywhere)."""
    return contains(
        node,
        lambda n: (
            is_node(n, ast.ColumnRef | ast.A_Star | ast.GroupingFunc) or is_aggregate(n) or is_window(n)
        ),
    )


def is_row_form(node: Any) -> bool:
    """``ROW(a, b)``, ``(a, b)`` or ``t.*``: the record form of predict."""
    if is_node(node, ast.RowExpr):
        return True
    return is_node(node, ast.ColumnRef) and is_node(node.fields[-1], ast.A_Star)
