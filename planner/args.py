"""Where a pgml argument's value comes from, decided from its AST alone.

Owns the literal folding of constant arguments (``'m'``, ``'{"a":1}'::jsonb``,
``ARRAY['a','b']``, ``$1``) into Python values, the SQL type an argument is cast to when
it is sent upstream, and the collection of the one-off evaluation query for
row-independent arguments that are not literals (``lower($1)``, ``now()::text``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import psycopg
from pglast import ast
from psycopg.adapt import Transformer
from psycopg.pq import Format

from core.errors import InvalidTextRepresentation, NumericValueOutOfRange, StatementTooComplex
from planner import sqltree as t
from planner.catalog import ANY, OID_TYPES, TYPE_OIDS, BoundCall
from planner.plan import ArgSource, CallPlan, ClientParam, Evaluated, Literal, RowColumn

NOT_LITERAL = object()
FOLD_MIN_ELEMENTS = 256  # shorter ARRAY[...] literals are cheap enough as pglast nodes
# What the text-level fold skips over (strings, quoted names, comments) or looks for (ARRAY[).
_SKIP_OR_ARRAY = re.compile(
    r"[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/"
    r"|\$(?P<tag>[A-Za-z_]\w*)?\$.*?\$(?P=tag)?\$|(?P<array>\bARRAY\s*\[)",
    re.S | re.I,
)
_NUMBER_CHARS = str.maketrans("", "", "0123456789.,+-eE \t\r\n")
_SPACES = str.maketrans("", "", " \t\r\n")
_ITEM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_ITEMS = re.compile(rf"{_ITEM}(?:,{_ITEM})*")
_INT4_MAX, _INT8_MAX = 2**31 - 1, 2**63 - 1


def fold_array_literals(sql: str) -> str:
    """`ARRAY[1.5, 2, ...]` of many plain numbers as one array-literal string of the same type.

    A 10^6-element ARRAY[...] in the SQL text is 10^6 pglast nodes, walked many times by the
    analysis (minutes, gigabytes); `('{1.5,2,...}'::numeric[])` is one node, and its value is
    read by psycopg's C array loader. The type is the one Postgres gives the ARRAY (integer,
    bigint or numeric), so the statement means the same wherever it runs. Strings, quoted
    names and comments are skipped, so only real ARRAY constructors are touched; every check
    here is a C-speed string operation (no per-element Python work but the item test).
    """
    if len(sql) < FOLD_MIN_ELEMENTS * 2:
        return sql
    out: list[str] = []
    done = pos = 0
    while (found := _SKIP_OR_ARRAY.search(sql, pos)) is not None:
        pos = found.end()
        if found.group("array") is None:
            continue
        close = sql.find("]", pos)
        body = sql[pos:close]
        if close < 0 or body.count(",") + 1 < FOLD_MIN_ELEMENTS or body.translate(_NUMBER_CHARS):
            continue
        compact = body.translate(_SPACES)
        if not _ITEMS.fullmatch(compact):
            continue  # `1..2`, `1-2`, an empty element: left to the parser's own error
        # Parenthesised: `ARRAY[1,2][1]` must stay a subscript, not become a cast to int[][1].
        out += [sql[done : found.start()], f"('{{{compact}}}'::{_array_type(compact)})"]
        done = pos = close + 1
    return "".join(out) + sql[done:] if out else sql


def _array_type(body: str) -> str:
    """The type Postgres resolves for ARRAY[...] of these numeric constants."""
    if "." in body or "e" in body or "E" in body:
        return "numeric[]"
    if not re.search(r"\d{10}", body):
        return "integer[]"
    biggest = max(abs(int(x)) for x in body.split(","))
    return "integer[]" if biggest <= _INT4_MAX else "bigint[]" if biggest <= _INT8_MAX else "numeric[]"


# The type a `$n` of OID 0 is read as when the pgml argument has no single SQL type.
ANY_PARAM_TYPES = {"features": "real[]", "inputs": "text[]"}
_TX = Transformer()
_REAL_MAX = 3.4028234663852886e38  # float4's largest finite value


def parse_json(text: str) -> Any:
    """A json/jsonb argument's value, with Postgres's SQLSTATEs and wording for bad text.

    Postgres accepts nesting up to its stack depth (thousands of levels); Python's parser
    stops near 1,000: deeper input gets Postgres's answer for too deep, 54001.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidTextRepresentation(
            "invalid input syntax for type json", detail=f"{exc.msg} at character {exc.pos + 1}."
        ) from exc
    except RecursionError as exc:
        raise StatementTooComplex(
            "stack depth limit exceeded", detail="the JSON value is nested too deeply for pgml-proxy"
        ) from exc


def _number(value: Any, sql_type: str) -> float:
    """A real/float8 value; text and numbers beyond the type's range are 22003 as in Postgres."""
    number = float(value)
    limit = _REAL_MAX if sql_type == "real" else float("inf")
    finite_text = not (isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity"))
    if (number != number) or not finite_text or abs(number) <= limit:  # NaN and spelled-out Infinity
        return number
    raise NumericValueOutOfRange(f'"{value}" is out of range for type {sql_type}')


def type_of(name: Any) -> str | None:
    """`real[]`, `jsonb`, `vector`... for a TypeName, or None for types we cannot read locally."""
    base = name.names[-1].sval
    base = {
        "float4": "real",
        "int8": "bigint",
        "int4": "int",
        "int2": "smallint",
        "float8": "float8",
        "bool": "bool",
    }.get(base, base)
    if base == "vector" and not name.arrayBounds:
        return "vector"
    full = base + ("[]" if name.arrayBounds else "")
    return full if full in TYPE_OIDS else None


def coerce(value: Any, sql_type: str) -> Any:
    """A literal's value as the runtime expects it for an argument of `sql_type`."""
    if value is None or sql_type == ANY:
        return value
    try:
        if sql_type in ("jsonb", "json"):
            return parse_json(value) if isinstance(value, str) else value
        if sql_type.endswith("[]"):
            if isinstance(value, str):
                return array_text(value, sql_type)
            if not isinstance(value, (list, tuple)):
                raise InvalidTextRepresentation(f'malformed array literal: "{value}"')
            return [coerce(v, sql_type[:-2]) for v in value]
        if sql_type in ("real", "float8", "numeric"):
            return _number(value, sql_type)
        if sql_type in ("bigint", "int", "smallint", "integer"):
            return int(value)
        if sql_type == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("t", "true", "on", "1", "yes")
        if sql_type in ("text", "varchar"):
            return (
                value
                if isinstance(value, str)
                else json.dumps(value)
                if isinstance(value, dict)
                else str(value)
            )
    except (ValueError, TypeError) as exc:
        raise InvalidTextRepresentation(f'invalid input syntax for type {sql_type}: "{value}"') from exc
    return value


def array_text(text: str, sql_type: str) -> Any:
    """An array's text form (`{1,2,3}`) as a list, by psycopg's loader; 22P02 as Postgres words it."""
    try:
        return _TX.get_loader(TYPE_OIDS[sql_type], Format.TEXT).load(text.encode())
    except psycopg.DataError as exc:
        raise InvalidTextRepresentation(f'malformed array literal: "{text[:200]}"', detail=str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise InvalidTextRepresentation(
            f'invalid input syntax for type {sql_type[:-2]}: "{text[:200]}"', detail=str(exc)
        ) from exc


def literal_value(node: Any, sql_type: str) -> Any:
    """The Python value of a literal argument, or NOT_LITERAL."""
    if t.is_node(node, ast.A_Const):
        if node.isnull:
            return None
        val = node.val
        raw: Any
        if t.is_node(val, ast.Integer):
            raw = val.ival
        elif t.is_node(val, ast.Float):
            raw = float(val.fval)
            if math.isinf(raw):  # a numeric literal beyond float8: 22003 as its cast would give
                raise NumericValueOutOfRange(f'"{val.fval}" is out of range for type double precision')
        elif t.is_node(val, ast.Boolean):
            raw = val.boolval
        elif t.is_node(val, ast.String):
            raw = val.sval
        else:
            return NOT_LITERAL
        return coerce(raw, sql_type)
    if t.is_node(node, ast.TypeCast):
        cast_type = type_of(node.typeName)
        if cast_type is None and node.typeName.arrayBounds and node.typeName.names[-1].sval == "numeric":
            cast_type = "float8[]"  # numeric[] literals (folded ARRAYs): read as float8, as predict does
        if cast_type is None or cast_type == "vector":
            return NOT_LITERAL
        inner = literal_value(node.arg, ANY)
        if inner is NOT_LITERAL:
            return NOT_LITERAL
        return coerce(coerce(inner, cast_type), sql_type)
    if t.is_node(node, ast.A_ArrayExpr):
        elem = sql_type[:-2] if sql_type.endswith("[]") else ANY
        items = [literal_value(e, elem) for e in node.elements or ()]
        return NOT_LITERAL if any(i is NOT_LITERAL for i in items) else items
    return NOT_LITERAL


def upstream_expr(node: Any, sql_type: str) -> Any:
    """The argument as sent upstream: cast to its declared type, records as jsonb."""
    node = copy.deepcopy(node)
    if t.is_row_form(node):
        return t.func("to_jsonb", node)
    return node if sql_type == ANY else t.cast(node, sql_type)


class ArgCollector:
    """Builds CallPlans for one statement and the shared one-off evaluation query."""

    def __init__(self, param_oids: Sequence[int]) -> None:
        self.param_oids = param_oids
        self.eval_exprs: list[Any] = []
        self.param_types: dict[int, str] = {}
        self.count = 0

    def plan(self, bound: BoundCall, row_exprs: list[Any] | None = None) -> CallPlan:
        """Sources for every given argument; row-dependent ones append to `row_exprs`."""
        self.count += 1
        sig = bound.sig
        types = {a.name: a.type for a in sig.args}
        sources: dict[str, ArgSource] = {}
        for name, node in bound.args.items():
            sql_type = types[name]
            if t.row_dependent(node):
                if row_exprs is None:
                    raise AssertionError("row-dependent argument without a row scope")
                sources[name] = RowColumn(len(row_exprs))
                row_exprs.append(upstream_expr(node, sql_type))
                continue
            sources[name] = self._constant(name, node, sql_type)
        label = f"pgml.{sig.name} #{self.count}"
        return CallPlan(self.count, sig, sources, bound.defaults(), label)

    def _constant(self, name: str, node: Any, sql_type: str) -> ArgSource:
        value = literal_value(node, sql_type)
        if value is not NOT_LITERAL:
            return Literal(value)
        target = node
        read_as = sql_type
        if t.is_node(node, ast.TypeCast) and t.is_node(node.arg, ast.ParamRef):
            cast_type = type_of(node.typeName)
            if cast_type is not None and cast_type != "vector":
                target, read_as = node.arg, cast_type
        if t.is_node(target, ast.ParamRef):
            if read_as == ANY:
                # A parameter the client declared as JSON or an array (sqlx binds `inputs` as
                # jsonb[]) is read as that type; text and undeclared ones as the argument's usual
                # type, whose text form the runtime parses.
                n = target.number
                declared = OID_TYPES.get(self.param_oids[n - 1], "") if n <= len(self.param_oids) else ""
                structured = declared.endswith("[]") or declared in ("json", "jsonb")
                read_as = declared if structured else ANY_PARAM_TYPES.get(name, "text")
            self.param_types.setdefault(target.number, read_as)
            return ClientParam(target.number, read_as)
        self.eval_exprs.append(upstream_expr(node, sql_type))
        return Evaluated(len(self.eval_exprs) - 1)

    def eval_sql(self) -> str | None:
        if not self.eval_exprs:
            return None
        return t.deparse(t.select([t.target(e, f"a{i}") for i, e in enumerate(self.eval_exprs)]))
