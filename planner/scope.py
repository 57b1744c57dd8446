"""Materialise-and-join: rewrites for row-dependent pgml calls that cannot be streamed.

Owns the "scope" of a call (the FROM, WHERE and GROUP BY its arguments are evaluated
over, CTEs included), the temp-table DDL that collects the call's distinct argument
tuples upstream, and the lookup that replaces the call (a scalar subquery, or for a
set-returning call in FROM a LATERAL subquery). Calls are resolved in rounds: one whose
scope still holds an unresolved pgml call waits until that call is replaced.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Callable
from typing import Any

from pglast import ast
from pglast.enums import CoercionForm, JoinType, SortByDir, SortByNulls, SubLinkType

from core.errors import FeatureNotSupported
from planner import sqltree as t
from planner.args import ArgCollector
from planner.catalog import BoundCall, bind, is_runtime_call, row_type
from planner.plan import StatementPlan, TempStep

_GROUPED = ("targetList", "sortClause", "havingClause", "distinctClause")


def _has_calls(node: object) -> bool:
    return t.contains(node, lambda n: t.is_node(n, ast.FuncCall) and is_runtime_call(n))


class Materialiser:
    def __init__(
        self, plan: StatementPlan, stmt: Any, bound: dict[int, BoundCall], collector: ArgCollector
    ) -> None:
        self.plan, self.stmt, self.bound, self.collector = plan, stmt, bound, collector
        # A cursor's tables live until its transaction ends, beside other statements' tables.
        cursor = plan.cursor is not None
        digest = hashlib.sha1(plan.text.encode(), usedforsecurity=False).hexdigest()[:10]
        self.suffix = f"_{digest}" if cursor else ""
        self.on_commit = " ON COMMIT DROP" if cursor else ""

    def run(self, pending: list[tuple[Any, t.Path]]) -> None:
        remaining = list(pending)
        while remaining:
            done = [item for item in remaining if self._try(*item)]
            if not done:
                names = ", ".join(f"pgml.{n.funcname[1].sval}" for n, _ in remaining)
                raise FeatureNotSupported(
                    f"{names}: each call's rows depend on another pgml call (or on a recursive CTE), "
                    "so the proxy cannot evaluate them in batches beforehand"
                )
            remaining = [item for item in remaining if item not in done]

    def _try(self, node: Any, path: t.Path) -> bool:
        # Bound again: an inner call in the arguments may have been replaced by its lookup.
        b = self.bound[id(node)] = bind(node, self.collector.param_oids)
        if any(is_runtime_call(n) for n, _ in t.walk(node.args) if t.is_node(n, ast.FuncCall)):
            return False  # its inner calls first
        in_from = t.is_node(path[-1].parent, ast.RangeFunction)
        if not in_from and not b.sig.setof and self._try_derived(node, path, b):
            return True
        scope = self._scope(node, path, in_from)
        if scope is None:
            return False
        from_items, where, group, having, position, remap = scope
        exprs: list[Any] = []
        call = self.collector.plan(b, exprs)
        # Where the call's arguments read the row being inserted, its keys come from the rows
        # the INSERT gives, under the names they have there.
        scoped = [remap(e) for e in exprs] if remap is not None else exprs
        n = len(self.plan.steps) + 1
        keys, results = f"pgml_k{n}{self.suffix}", f"pgml_r{n}{self.suffix}"
        step = TempStep(
            call=call,
            keys=None,
            create_keys=None,
            fetch_keys=None,
            results=results,
            create_results="",
            index_sql=[],
            srf=in_from or b.sig.setof,
            position=position,
        )
        if exprs:
            if b.sig.strict:
                nulls = [ast.NullTest(arg=copy.deepcopy(e), nulltesttype=1) for e in scoped]
                # An aggregate argument (`pgml.embed(m, array_agg(chunk))`) is known per group.
                if any(t.contains(e, t.is_aggregate) for e in scoped):
                    having = having + nulls
                else:
                    where = where + nulls
            scope_sel = t.select(
                [t.target(copy.deepcopy(e), f"pgml_a{i}") for i, e in enumerate(scoped)],
                from_items,
                t.and_(where),
                distinctClause=(None,),
                groupClause=group or None,
                havingClause=t.and_(having),
            )
            if not self._set_keys(step, keys, path, scope_sel, len(exprs)):
                return False
            step.index_sql = [
                f"CREATE INDEX ON pg_temp.{keys} (pgml_k)",
                f"CREATE INDEX ON pg_temp.{keys} USING hash (pgml_a0)",
                f"ANALYZE pg_temp.{keys}",
            ]
        if in_from:
            self._replace_srf(step, b, path, exprs)
        elif b.sig.setof:
            self._replace_srf_target(step, b, path, exprs)
        else:
            step.create_results = (
                f"CREATE TEMPORARY TABLE {results} (pgml_k bigint{' PRIMARY KEY' if exprs else ''}, "
                f"pgml_v {_sql_type(b.sig.returns)}){self.on_commit}"
            )
            t.replace(path[-1], self._lookup(step, b.sig.name, exprs))
        step.post_sql = [f"CREATE INDEX ON pg_temp.{results} (pgml_k)"] if step.srf and exprs else []
        step.post_sql.append(f"ANALYZE pg_temp.{results}")
        self.plan.steps.append(step)
        return True

    # --- a derived table, evaluated once ------------------------------------------------------------
    def _try_derived(self, node: Any, path: t.Path, b: BoundCall) -> bool:
        """A call in the select list of a derived table (`FROM (SELECT ..., pgml.transform(...)
        AS p FROM v LIMIT 2) s`): the derived table's rows are read once into a temporary table
        with the call's arguments beside them, the call runs on those rows, and the derived
        table becomes a read of the two tables. Evaluating it twice (keys, then the statement)
        would read other rows where its source is volatile (the README's test view is ordered
        by random()), and a LIMIT would not bound the keys. False where this does not apply."""
        idx = t.level_index(path)
        level, clause = path[idx].parent, path[idx].attr
        holder: Any = path[idx - 1].parent if idx > 0 else None
        if (
            not t.is_node(level, ast.SelectStmt)
            or clause != "targetList"
            or not t.is_node(holder, ast.RangeSubselect)
            or holder.lateral
            or level.op != 0
            or level.fromClause is None
            or level.intoClause is not None
            or len(path) != idx + 2  # the target is the call itself
        ):
            return False
        calls = [n for n, _ in t.walk(level) if t.is_node(n, ast.FuncCall) and is_runtime_call(n)]
        names = [_column_name(tg) for tg in level.targetList]
        if calls != [node] or None in names or len(set(names)) != len(names):
            return False
        position = path[idx].index or 0
        exprs: list[Any] = []
        call = self.collector.plan(b, exprs)
        n = len(self.plan.steps) + 1
        keys, results = f"pgml_k{n}{self.suffix}", f"pgml_r{n}{self.suffix}"
        inner = copy.copy(level)  # the derived table, its call replaced by the call's arguments
        targets = [t.target(copy.deepcopy(tg.val), f"pgml_c{i}")
                   for i, tg in enumerate(level.targetList) if i != position]
        args = [t.target(copy.deepcopy(e), f"pgml_a{i}") for i, e in enumerate(exprs)]
        inner.targetList = tuple(targets + args)
        inner.withClause = None  # _set_keys gives it the CTEs it reads, its own among them
        step = TempStep(
            call=call,
            keys=None,
            create_keys=None,
            fetch_keys=None,
            results=results,
            create_results=(
                f"CREATE TEMPORARY TABLE {results} (pgml_k bigint PRIMARY KEY, "
                f"pgml_v {_sql_type(b.sig.returns)}){self.on_commit}"
            ),
            index_sql=[f"CREATE INDEX ON pg_temp.{keys} (pgml_k)", f"ANALYZE pg_temp.{keys}"],
            srf=False,
            position="derived table (read once)",
        )
        if not self._set_keys(step, keys, path, inner, len(exprs)):
            return False
        step.post_sql = [f"ANALYZE pg_temp.{results}"]
        out: list[Any] = []
        for i, name in enumerate(names):
            column = f"pgml_c{i - 1 if i > position else i}"
            value = t.col("pgml_r", "pgml_v") if i == position else t.col("pgml_s", column)
            out.append(t.target(value, name))
        holder.subquery = t.select(
            out,
            [ast.JoinExpr(jointype=JoinType.JOIN_LEFT, larg=t.rangevar(keys, "pgml_s"),
                          rarg=t.rangevar(results, "pgml_r"),
                          quals=t.eq(t.col("pgml_r", "pgml_k"), t.col("pgml_s", "pgml_k")))],
            sortClause=_ascending(t.col("pgml_s", "pgml_k")),
        )
        self.plan.steps.append(step)
        return True

    def _set_keys(self, step: TempStep, keys: str, path: t.Path, scope: Any, n_args: int) -> bool:
        """Make `keys` the numbered rows of `scope` (a SELECT whose first columns after its
        own are the arguments `pgml_a0..`), read back in slices; False when a CTE it reads
        still has pgml calls."""
        with_clause = self._with_clause(path, scope)
        if with_clause is False:
            return False
        scope.withClause = with_clause
        numbered = t.select(
            [
                t.target(ast.FuncCall(funcname=(t.s("row_number"),), over=ast.WindowDef(frameOptions=1058)),
                         "pgml_k"),
                t.target(ast.ColumnRef(fields=(t.s("pgml_d"), ast.A_Star()))),
            ],
            [ast.RangeSubselect(lateral=False, subquery=scope, alias=ast.Alias(aliasname="pgml_d"))],
        )
        step.keys = keys
        step.keys_select = t.deparse(numbered)
        step.create_keys = f"CREATE TEMPORARY TABLE {keys}{self.on_commit} AS {step.keys_select}"
        step.keys_params = sorted({n.number for n, _ in t.walk(numbered) if t.is_node(n, ast.ParamRef)})
        step.fetch_keys = t.deparse(
            t.select(
                [t.target(t.col("pgml_k"))] + [t.target(t.col(f"pgml_a{i}")) for i in range(n_args)],
                [t.rangevar(keys)],
                t.and_([
                    ast.A_Expr(kind=0, name=(t.s(">"),), lexpr=t.col("pgml_k"), rexpr=t.param(1)),
                    ast.A_Expr(kind=0, name=(t.s("<="),), lexpr=t.col("pgml_k"), rexpr=t.param(2)),
                ]),
            )
        )
        return True

    # --- scope ----------------------------------------------------------------------------------
    def _scope(
        self, node: Any, path: t.Path, in_from: bool
    ) -> tuple[list[Any], list[Any], list[Any], list[Any], str, Callable[[Any], Any] | None] | None:
        idx = t.level_index(path)
        level, clause = path[idx].parent, path[idx].attr
        if t.is_node(level, ast.InsertStmt) and not in_from:
            return self._insert_scope(node, level, clause)
        if t.is_node(level, ast.InsertStmt) or clause in (
            "returningList",
            "returningClause",
            "onConflictClause",
        ):
            raise FeatureNotSupported(
                f"pgml.{node.funcname[1].sval} with row-dependent arguments in {clause} is not supported: "
                "its rows are not known before the statement runs"
            )
        # A CTE's own FROM-less SELECT (`WITH q AS (SELECT pgml.embed(m, (SELECT ... FROM cfg)))`)
        # is its own scope: evaluated once.
        in_cte = idx > 0 and t.is_node(path[idx - 1].parent, ast.CommonTableExpr)
        if t.is_node(level, ast.SelectStmt) and not level.fromClause and not in_from and not in_cte:
            outer = [
                i
                for i in range(idx - 1, -1, -1)
                if t.is_node(path[i].parent, ast.SelectStmt | ast.UpdateStmt | ast.DeleteStmt)
            ]
            if outer:  # a FROM-less subquery's columns come from the enclosing query
                idx = outer[0]
                level, clause = path[idx].parent, path[idx].attr
        position = f"{type(level).__name__}.{clause}"
        if in_from:
            rf = path[-1].parent
            from_items = _left_of(level.fromClause, rf)
            return (from_items, [], [], [], "FROM", None) if not _has_calls(from_items) else None
        if t.is_node(level, ast.UpdateStmt):
            from_items = [level.relation, *(level.fromClause or ())]
        elif t.is_node(level, ast.DeleteStmt):
            from_items = [level.relation, *(level.usingClause or ())]
        else:
            from_items = list(level.fromClause or ())
        from_items = _copy_without_join_quals(from_items, path)
        if _has_calls(from_items):
            return None
        where = [] if clause == "fromClause" else _clean(level.whereClause, node)
        group: list[Any] = []
        having: list[Any] = []
        if t.is_node(level, ast.SelectStmt) and clause in _GROUPED and level.groupClause:
            if _has_calls(level.groupClause):
                return None
            group = copy.deepcopy(list(level.groupClause))
            having = _clean(level.havingClause, node)
        return from_items, where, group, having, position, None

    def _insert_scope(
        self, node: Any, ins: Any, clause: str
    ) -> tuple[list[Any], list[Any], list[Any], list[Any], str, Callable[[Any], Any]]:
        """A call in INSERT ... RETURNING or ON CONFLICT DO UPDATE reading the row being inserted
        (`RETURNING pgml.embed('m', body)`, `SET e = pgml.embed('m', excluded.body)`): the rows
        the INSERT gives (its VALUES or SELECT, under its column list) are its scope. What a
        trigger or a default would change is not seen, nor is the existing row of a conflict."""
        name = node.funcname[1].sval
        if ins.selectStmt is None or not ins.cols:
            raise FeatureNotSupported(
                f"pgml.{name} with row-dependent arguments in {clause} needs INSERT INTO t (columns) VALUES"
                " or SELECT: the rows are otherwise not known before the statement runs",
                hint="name the inserted columns",
            )
        cols = [c.name for c in ins.cols]
        own = {ins.relation.relname} | ({ins.relation.alias.aliasname} if ins.relation.alias else set())
        # In ON CONFLICT, EXCLUDED is the row being inserted; the table's name is the existing row.
        conflict = clause == "onConflictClause"
        remap = functools.partial(
            _remap_inserted, cols=set(cols), qualifiers={"excluded"} if conflict else own,
            conflict=conflict, name=name,
        )
        source = ast.RangeSubselect(
            lateral=False,
            subquery=copy.deepcopy(ins.selectStmt),
            alias=ast.Alias(aliasname="pgml_ins", colnames=tuple(t.s(c) for c in cols)),
        )
        return [source], [], [], [], f"InsertStmt.{clause}", remap

    def _with_clause(self, path: t.Path, scope: Any) -> Any | bool | None:
        """The CTEs visible at the call that `scope` reads (in FROM, its arguments, WHERE, ...,
        and what those CTEs read in turn); False when one of them still has pgml calls."""
        seen: dict[str, Any] = {}
        recursive = False
        # Innermost first: an inner CTE hides an outer one of the same name.
        clauses: list[Any] = [
            c
            for c in (getattr(s.parent, "withClause", None) for s in reversed(path))
            if t.is_node(c, ast.WithClause)
        ]
        for clause in clauses:
            recursive = recursive or bool(clause.recursive)
            for cte in clause.ctes:
                seen.setdefault(cte.ctename, cte)
        if not seen:
            return None
        referenced = _relnames(scope)
        keep: set[int] = set()
        for clause in clauses:
            for cte in reversed(clause.ctes):  # a CTE reads only those before it (or outside)
                if id(seen.get(cte.ctename)) != id(cte) or cte.ctename not in referenced:
                    continue
                if _has_calls(cte.ctequery):
                    return False
                if not t.is_node(cte.ctequery, ast.SelectStmt):
                    raise FeatureNotSupported(
                        f'a pgml call reading the data-modifying CTE "{cte.ctename}" is not supported'
                    )
                keep.add(id(cte))
                referenced |= _relnames(cte.ctequery)
        ctes = [copy.deepcopy(cte) for clause in reversed(clauses) for cte in clause.ctes if id(cte) in keep]
        return ast.WithClause(ctes=tuple(ctes), recursive=recursive) if ctes else None

    # --- replacements ---------------------------------------------------------------------------
    def _lookup(self, step: TempStep, name: str, exprs: list[Any]) -> Any:
        if step.keys is None:  # a nested call with constant arguments: its one result
            return t.scalar_subquery(
                t.select([t.target(t.col("pgml_r", "pgml_v"), name)], [t.rangevar(step.results, "pgml_r")])
            )
        sel = t.select(
            [t.target(t.col("pgml_r", "pgml_v"), name)],
            [
                t.inner_join(
                    t.rangevar(step.keys, "pgml_k"),
                    t.rangevar(step.results, "pgml_r"),
                    t.eq(t.col("pgml_r", "pgml_k"), t.col("pgml_k", "pgml_k")),
                )
            ],
            t.and_([t.eq(t.col("pgml_k", f"pgml_a{i}"), copy.deepcopy(e)) for i, e in enumerate(exprs)]),
        )
        return t.scalar_subquery(sel)

    def _replace_srf_target(self, step: TempStep, b: BoundCall, path: t.Path, exprs: list[Any]) -> None:
        """A set-returning call outside FROM (`SELECT id, pgml.chunk('character', body) AS c FROM
        docs`): its rows for the current arguments, as an array of the function's row type
        (`pgml._chunk_row`, made by migration 0006), become `unnest(ARRAY(...))`, which Postgres
        expands where the call stood, in step with any other set-returning call of that list.
        A table function's value is then the composite (`(c).chunk_index` reads it); a scalar
        one's its only field (an array of real[] would be read as two dimensions)."""
        cols = list(b.sig.out_columns())
        step.create_results = self._srf_results(step, cols)
        row = ast.RowExpr(
            args=tuple(t.col("pgml_s", f"pgml_c{i}") for i in range(len(cols))),
            row_format=CoercionForm.COERCE_EXPLICIT_CALL,
        )
        element = t.cast(row, row_type(b.sig))
        from_, where = _srf_rows(step, exprs)
        rows = ast.SubLink(
            subLinkType=SubLinkType.ARRAY_SUBLINK,
            subselect=t.select(
                [t.target(element)], from_, where, sortClause=_ascending(t.col("pgml_s", "pgml_ord"))
            ),
        )
        expanded: Any = t.func("unnest", rows)
        if not b.sig.is_table:
            expanded = ast.A_Indirection(arg=expanded, indirection=(t.s(cols[0][0]),))
        t.replace(path[-1], expanded)

    def _srf_results(self, step: TempStep, cols: list[tuple[str, str]]) -> str:
        """The results table of a set-returning call: rows of (key, ordinal, its columns)."""
        return (
            f"CREATE TEMPORARY TABLE {step.results} (pgml_k bigint, pgml_ord bigint, "
            + ", ".join(f"pgml_c{i} {_sql_type(typ)}" for i, (_, typ) in enumerate(cols))
            + ")"
            + self.on_commit
        )

    def _replace_srf(self, step: TempStep, b: BoundCall, path: t.Path, exprs: list[Any]) -> None:
        from planner.analyze import srf_columns

        rf = path[-1].parent
        if rf.is_rowsfrom or len(rf.functions) != 1 or rf.functions[0][1]:
            raise FeatureNotSupported(
                f"pgml.{b.sig.name} in ROWS FROM(...) or with a column definition list is not supported"
            )
        alias = rf.alias
        extra = None
        if alias is not None and rf.ordinality and len(alias.colnames or ()) > len(b.sig.out_columns()):
            extra = alias.colnames[-1].sval
            alias = ast.Alias(aliasname=alias.aliasname, colnames=alias.colnames[:-1])
        cols = srf_columns(b, alias)
        step.create_results = self._srf_results(step, cols)
        targets = [t.target(t.col("pgml_s", f"pgml_c{i}"), name) for i, (name, _) in enumerate(cols)]
        if rf.ordinality:
            targets.append(t.target(t.col("pgml_s", "pgml_ord"), extra or "ordinality"))
        from_, where = _srf_rows(step, exprs)
        sub = ast.RangeSubselect(
            lateral=step.keys is not None,
            subquery=t.select(targets, from_, where, sortClause=_ascending(t.col("pgml_s", "pgml_ord"))),
            alias=ast.Alias(aliasname=rf.alias.aliasname if rf.alias else b.sig.name),
        )
        t.replace(path[-3], sub)


def _srf_rows(step: TempStep, exprs: list[Any]) -> tuple[list[Any], Any | None]:
    """FROM and WHERE of the read of a set-returning call's rows for the arguments at hand."""
    if step.keys is None:
        return [t.rangevar(step.results, "pgml_s")], None
    from_ = [
        t.inner_join(
            t.rangevar(step.keys, "pgml_k"),
            t.rangevar(step.results, "pgml_s"),
            t.eq(t.col("pgml_s", "pgml_k"), t.col("pgml_k", "pgml_k")),
        )
    ]
    where = t.and_([t.eq(t.col("pgml_k", f"pgml_a{i}"), copy.deepcopy(e)) for i, e in enumerate(exprs)])
    return from_, where


def _ascending(column: Any) -> tuple[Any, ...]:
    return (
        ast.SortBy(
            node=column, sortby_dir=SortByDir.SORTBY_DEFAULT, sortby_nulls=SortByNulls.SORTBY_NULLS_DEFAULT
        ),
    )


def _column_name(target: Any) -> str | None:
    """The output name Postgres gives a select-list entry, where it is plain to see (an alias,
    a column, a function call's name); None otherwise (`*`, an operator expression)."""
    if not t.is_node(target, ast.ResTarget):
        return None
    if target.name:
        return str(target.name)
    value = target.val
    while t.is_node(value, ast.TypeCast) and not t.is_node(value.arg, ast.A_Const):
        value = value.arg
    if t.is_node(value, ast.ColumnRef) and t.is_node(value.fields[-1], ast.String):
        return str(value.fields[-1].sval)
    if t.is_node(value, ast.FuncCall):
        return str(value.funcname[-1].sval)
    return None


def _remap_inserted(
    expr: Any, *, cols: set[str], qualifiers: set[str], conflict: bool, name: str
) -> Any:
    """A copy of `expr` reading the inserted rows' columns from `pgml_ins` (see _insert_scope)."""
    expr = copy.deepcopy(expr)
    for ref, path in list(t.walk(expr)):
        if not t.is_node(ref, ast.ColumnRef):
            continue
        fields = [f.sval if t.is_node(f, ast.String) else "*" for f in ref.fields]
        bare = len(fields) == 1 and not conflict
        if (bare or (len(fields) == 2 and fields[0] in qualifiers)) and fields[-1] in cols:
            new = t.col("pgml_ins", fields[-1])
            if path:
                t.replace(path[-1], new)
            else:
                expr = new
            continue
        raise FeatureNotSupported(
            f"pgml.{name}: {'.'.join(fields)} is not a column the INSERT gives, so its value is not known"
            " before the statement runs"
        )
    return expr


def _relnames(tree: object) -> set[str]:
    """The unqualified relation names a tree reads: the CTEs it may refer to."""
    return {n.relname for n, _ in t.walk(tree) if t.is_node(n, ast.RangeVar) and n.schemaname is None}


def _sql_type(name: str) -> str:
    return {"real[]": "real[]", "real": "real"}.get(name, name)


def _clean(node: Any | None, call: Any) -> list[Any]:
    """The AND-conjuncts without pgml calls: dropping a conjunct only widens the scope."""
    return [
        copy.deepcopy(c)
        for c in t.conjuncts(node)
        if not _has_calls(c) and not t.contains(c, lambda n: n is call)
    ]


def _copy_without_join_quals(items: list[Any], path: t.Path) -> list[Any]:
    """A copy of FROM items where the JOIN ... ON holding the call (if any) becomes ON TRUE."""
    joins = [s.parent for s in path if t.is_node(s.parent, ast.JoinExpr) and s.attr == "quals"]
    saved = [(j, j.quals) for j in joins]
    for j, _ in saved:
        j.quals = t.true()
    try:
        return copy.deepcopy(items)
    finally:
        for j, quals in saved:
            j.quals = quals


def _contains_node(tree: object, target: Any) -> bool:
    return t.contains(tree, lambda n: n is target)


def _left_of(from_clause: tuple[Any, ...] | None, rf: Any) -> list[Any]:
    """The FROM items a LATERAL function can see: everything before it (joined by ON TRUE)."""
    out: list[Any] = []
    for item in from_clause or ():
        if _contains_node(item, rf):
            left = _left_part(item, rf)
            if left is not None:
                out.append(left)
            break
        out.append(copy.deepcopy(item))
    return out


def _left_part(item: Any, rf: Any) -> Any | None:
    if item is rf or not t.is_node(item, ast.JoinExpr):
        return None
    if _contains_node(item.rarg, rf):
        right = _left_part(item.rarg, rf)
        left = copy.deepcopy(item.larg)
        return left if right is None else t.inner_join(left, right, t.true())
    return _left_part(item.larg, rf)
