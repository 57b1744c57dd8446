"""`analyze(sql) -> [StatementPlan]`: find the pgml calls of each statement and decide where each runs.

Pure (no I/O). A call whose arguments are row-independent is evaluated once and
passed as a typed parameter; a row-dependent call at the top of a SELECT list is
streamed (its arguments go upstream, results are merged into the rows); any other
row-dependent call, and every set-returning call in FROM, is materialised into
temporary tables by `planner.scope` and replaced by a lookup. Statements with nothing
but pgml calls are answered locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import ObjectType
from pglast.parser import ParseError

from core.errors import FeatureNotSupported, SyntaxError_
from planner import sqltree as t
from planner.args import ArgCollector, type_of
from planner.catalog import TYPE_OIDS, BoundCall, bind, is_runtime_call, row_type
from planner.plan import ConstCall, LocalTarget, StatementPlan, StreamCallPlan
from planner.scope import Materialiser

_SUPPORTED = (
    ast.SelectStmt,
    ast.InsertStmt,
    ast.UpdateStmt,
    ast.DeleteStmt,
    ast.CreateTableAsStmt,
    ast.CopyStmt,
)


_CURSOR_OPT_HOLD = 0x0020  # parsenodes.h: DECLARE ... WITH HOLD


def split(sql: str) -> list[tuple[Any, str]]:
    """Parse `sql` into statements with each one's original text; raises 42601 on bad syntax."""
    try:
        raws = parse_sql(sql)
    except ParseError as exc:
        raise SyntaxError_(str(exc.args[0]) if exc.args else "syntax error") from exc
    out = []
    for raw in raws:
        start: int = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        out.append((raw, sql[start:end].strip()))
    return out


def analyze(sql: str, param_oids: Sequence[int] = (), ctas_embedding: str = "vector") -> list[StatementPlan]:
    return [analyze_statement(raw, text, param_oids, ctas_embedding) for raw, text in split(sql)]


def _command(stmt: Any) -> str:
    """The statement's node name; SELECT ... INTO (it makes a table, it returns no rows) apart."""
    if t.is_node(stmt, ast.SelectStmt) and stmt.intoClause is not None:
        return "SelectIntoStmt"
    return type(stmt).__name__


def find_calls(node: Any) -> list[tuple[Any, t.Path]]:
    return [(n, p) for n, p in t.walk(node) if t.is_node(n, ast.FuncCall) and is_runtime_call(n)]


def analyze_statement(
    raw: Any, text: str, param_oids: Sequence[int] = (), ctas_embedding: str = "vector"
) -> StatementPlan:
    stmt = raw.stmt
    explain = stmt if t.is_node(stmt, ast.ExplainStmt) else None
    inner = explain.query if explain is not None else stmt
    # Postgres's column names for bare calls, before any call is wrapped or replaced.
    _name_targets(inner)
    vector_columns: list[tuple[str, str]] = []
    if ctas_embedding == "vector":
        # Before the calls are located: their paths must lead through the added cast.
        vector_columns = _ctas_embeddings_as_vectors(inner, param_oids)
    calls = find_calls(inner)
    plan = StatementPlan(
        text=text,
        kind="passthrough",
        command=_command(inner),
        vector_columns=vector_columns,
        # COPY (SELECT ... pgml ...) TO STDOUT: the rewritten COPY runs upstream and its CopyOut
        # messages are relayed to the client.
        copy_out=t.is_node(inner, ast.CopyStmt) and inner.filename is None and explain is None,
    )
    if not calls:
        return plan
    _check_container(inner, calls)
    _whole_row_references(calls)
    if t.is_node(inner, ast.DeclareCursorStmt):
        plan.cursor = inner.portalname
        plan.cursor_hold = bool(inner.options & _CURSOR_OPT_HOLD)
    bound = {id(node): bind(node, param_oids) for node, _ in calls}
    nested = _nested(calls)
    plan.n_params = max([len(param_oids)] + [n.number for n, _ in t.walk(stmt) if t.is_node(n, ast.ParamRef)])
    collector = ArgCollector(param_oids)
    if explain is None and not nested and _try_local(plan, inner, calls, bound, collector):
        plan.describe_sql = _describe_sql(text, param_oids)
        return plan
    _rewrite(plan, inner, calls, bound, collector, nested)
    plan.describe_sql = _describe_sql(text, param_oids) if explain is None else ""
    if explain is not None:
        explain.query = inner
        plan.explain_sql = t.deparse(explain)
        plan.explain_analyze = any(
            o.defname == "analyze" and (o.arg is None or _truthy(o.arg)) for o in explain.options or ()
        )
        plan.kind = "explain"
    return plan


def _ctas_embeddings_as_vectors(stmt: Any, param_oids: Sequence[int]) -> list[tuple[str, str]]:
    """In CREATE TABLE AS, make a bare `pgml.embed(model, text)` column a pgvector `vector`.

    The extension would create a real[] column, on which the README's next steps (an ivfflat
    index with vector_cosine_ops, `embedding <-> query::vector`) fail. An explicit cast written
    by the client wins; `[planner] ctas_embedding_type = "real[]"` keeps the extension's type.
    Returns the (table, column) pairs, deparsed as quoted identifiers, for the executor to give
    them their dimensions (`vector(384)`: ivfflat and hnsw indexes need them) once they are known.
    """
    if not t.is_node(stmt, ast.CreateTableAsStmt) or not t.is_node(stmt.query, ast.SelectStmt):
        return []
    if stmt.objtype != ObjectType.OBJECT_TABLE or stmt.into.colNames:
        return []  # column names given in the INTO list: leave the types as the extension gives
    table = t.deparse(stmt.into.rel)
    made: list[tuple[str, str]] = []
    for target in stmt.query.targetList or ():
        call = target.val
        if not (t.is_node(call, ast.FuncCall) and is_runtime_call(call)):
            continue
        if call.funcname[1].sval == "embed" and not bind(call, param_oids).sig.setof:
            target.val = ast.TypeCast(arg=call, typeName=t.type_name("vector"))
            made.append((table, t.deparse(ast.ColumnRef(fields=(t.s(target.name),)))))
    return made


def _truthy(node: Any) -> bool:
    val = getattr(node, "sval", None) or getattr(node, "boolval", None)
    return val not in ("false", "off", "0", False)


def _check_container(stmt: Any, calls: list[tuple[Any, t.Path]]) -> None:
    name = calls[0][0].funcname[1].sval
    cursor_of_select = t.is_node(stmt, ast.DeclareCursorStmt) and t.is_node(stmt.query, ast.SelectStmt)
    if not (t.is_node(stmt, _SUPPORTED) or cursor_of_select) or (
        t.is_node(stmt, ast.CreateTableAsStmt) and stmt.objtype != ObjectType.OBJECT_TABLE
    ):
        raise FeatureNotSupported(
            f"pgml.{name} inside {type(stmt).__name__} is not supported: the statement would run the call "
            "inside Postgres later (a view, function, index or rule body), where pgml functions do not exist",
            hint="run the pgml call in a SELECT, INSERT, UPDATE, DELETE or CREATE TABLE AS",
        )
    if t.is_node(stmt, ast.CopyStmt) and stmt.is_from:
        raise FeatureNotSupported(
            f"pgml.{name} in COPY ... FROM is not supported: COPY FROM reads rows, it computes none",
            hint="COPY into a table, then UPDATE it with the pgml call",
        )


def _call_of(node: Any) -> tuple[Any, list[Any]] | None:
    casts = []
    while t.is_node(node, ast.TypeCast):
        casts.append(node)
        node = node.arg
    if t.is_node(node, ast.FuncCall) and is_runtime_call(node):
        return node, casts
    return None


def _name_targets(stmt: Any) -> None:
    """Give `SELECT pgml.embed(...)` its Postgres column name before the call is replaced."""
    for node, _ in list(t.walk(stmt)):
        if t.is_node(node, ast.SelectStmt):
            for target in node.targetList or ():
                found = _call_of(target.val) if t.is_node(target, ast.ResTarget) else None
                if found is not None and target.name is None:
                    target.name = found[0].funcname[1].sval


def _out_type(sig_type: str, casts: list[Any]) -> str | None:
    """The type the client sees: the outermost cast's (when we can encode it), else the call's."""
    if not casts:
        return sig_type
    if len(casts) > 1:
        return None
    return type_of(casts[0].typeName)


_BARE_SELECT = (
    "fromClause",
    "whereClause",
    "groupClause",
    "havingClause",
    "sortClause",
    "limitCount",
    "limitOffset",
    "distinctClause",
    "withClause",
    "intoClause",
    "lockingClause",
    "valuesLists",
    "windowClause",
)


def _try_local(
    plan: StatementPlan,
    stmt: Any,
    calls: list[tuple[Any, t.Path]],
    bound: dict[int, BoundCall],
    collector: ArgCollector,
) -> bool:
    """`SELECT pgml.f(...), ...` and `SELECT * FROM pgml.f(...)` with row-independent arguments."""
    if (
        not t.is_node(stmt, ast.SelectStmt)
        or stmt.op != 0
        or any(t.row_dependent(n.args) for n, _ in calls if n.args)
    ):
        return False
    if any(getattr(stmt, a) for a in _BARE_SELECT if a != "fromClause") or stmt.groupDistinct:
        return False
    if stmt.fromClause:
        return _try_local_table(plan, stmt, bound, collector)
    targets = []
    for target in stmt.targetList:
        found = _call_of(target.val)
        if found is None:
            return False
        node, casts = found
        sig = bound[id(node)].sig
        out = _out_type(sig.returns, casts)
        if out is None or (sig.setof and len(stmt.targetList) > 1):
            return False
        targets.append(LocalTarget(collector.plan(bound[id(node)]), target.name, out))
    plan.kind, plan.local = "local", targets
    _finish_args(plan, collector)
    return True


def _try_local_table(
    plan: StatementPlan, stmt: Any, bound: dict[int, BoundCall], collector: ArgCollector
) -> bool:
    if len(stmt.fromClause) != 1 or not t.is_node(stmt.fromClause[0], ast.RangeFunction):
        return False
    rf = stmt.fromClause[0]
    star = (
        len(stmt.targetList) == 1
        and t.is_node(stmt.targetList[0].val, ast.ColumnRef)
        and t.is_node(stmt.targetList[0].val.fields[-1], ast.A_Star)
    )
    if not star or rf.ordinality or rf.is_rowsfrom or len(rf.functions) != 1 or rf.functions[0][1]:
        return False
    node = rf.functions[0][0]
    if not t.is_node(node, ast.FuncCall) or not is_runtime_call(node):
        return False
    b = bound[id(node)]
    plan.local = [LocalTarget(collector.plan(b), b.sig.name, b.sig.returns)]
    plan.local_columns = srf_columns(b, rf.alias)
    plan.kind = "local_table"
    _finish_args(plan, collector)
    return True


def srf_columns(b: BoundCall, alias: Any | None) -> list[tuple[str, str]]:
    """Output columns of a set-returning call in FROM, honouring `AS alias(c1, c2)`."""
    cols = list(b.sig.out_columns())
    if not b.sig.is_table:
        name = alias.aliasname if alias is not None else b.sig.name
        cols = [(name, cols[0][1])]
    names = [c.sval for c in (alias.colnames or ())] if alias is not None else []
    if len(names) > len(cols):
        raise SyntaxError_(
            f"pgml.{b.sig.name} returns {len(cols)} columns, but {len(names)} column aliases were given"
        )
    return [(names[i] if i < len(names) else c[0], c[1]) for i, c in enumerate(cols)]


def _finish_args(plan: StatementPlan, collector: ArgCollector) -> None:
    plan.eval_sql = collector.eval_sql()
    plan.param_types = dict(collector.param_types)


def _whole_row_references(calls: list[tuple[Any, t.Path]]) -> None:
    """`pgml.predict('p', d) FROM pgml.digits d`: a bare name that is no column but a FROM item's
    alias is the whole row, as Postgres reads it; it becomes `d.*`, predict's record form.
    (Postgres tries a column of that name first: a table with a column named like its own alias
    would be read differently here.)"""
    for node, path in calls:
        names: set[str] = set()
        for step in path:
            if t.is_node(step.parent, t.STATEMENT_LEVELS):
                names |= _from_aliases(step.parent)
        args = list(node.args or ())
        for i, arg in enumerate(args):
            holder = arg if t.is_node(arg, ast.NamedArgExpr) else None
            value = holder.arg if holder is not None else arg
            if (
                t.is_node(value, ast.ColumnRef)
                and len(value.fields) == 1
                and t.is_node(value.fields[0], ast.String)
                and value.fields[0].sval in names
            ):
                star = ast.ColumnRef(fields=(value.fields[0], ast.A_Star()))
                if holder is not None:
                    holder.arg = star
                else:
                    args[i] = star
        node.args = tuple(args) if args else node.args


def _from_aliases(level: Any) -> set[str]:
    items = list(getattr(level, "fromClause", None) or ())
    if t.is_node(level, ast.UpdateStmt | ast.DeleteStmt):
        items.append(level.relation)
    out: set[str] = set()
    for item, _ in t.walk(tuple(items)):
        if t.is_node(item, ast.RangeVar):
            out.add(item.alias.aliasname if item.alias is not None else item.relname)
        elif t.is_node(item, ast.RangeSubselect | ast.RangeFunction) and item.alias is not None:
            out.add(item.alias.aliasname)
    return out


def _nested(calls: list[tuple[Any, t.Path]]) -> set[int]:
    """The calls that hold another pgml call in their arguments, or stand in one's arguments
    (`pgml.predict('p', pgml.embed('m', body))`). Raises for a call in FROM inside another's
    arguments (`pgml.rank(m, q, ARRAY(SELECT chunk FROM pgml.chunk(...)))`)."""
    out: set[int] = set()
    for node, _ in calls:
        for inner, inner_path in t.walk(node.args):
            if not (t.is_node(inner, ast.FuncCall) and is_runtime_call(inner)):
                continue
            if inner_path and t.is_node(inner_path[-1].parent, ast.RangeFunction):
                raise FeatureNotSupported(
                    f"pgml.{inner.funcname[1].sval} in FROM inside pgml.{node.funcname[1].sval}'s arguments"
                    " is not supported",
                    hint="compute the inner call in a CTE first",
                )
            out |= {id(node), id(inner)}
    return out


def _rewrite(
    plan: StatementPlan,
    stmt: Any,
    calls: list[tuple[Any, t.Path]],
    bound: dict[int, BoundCall],
    collector: ArgCollector,
    nested: set[int],
) -> None:
    plan.kind = "upstream"
    next_param = plan.n_params
    pending: list[tuple[Any, t.Path]] = []
    streamed: list[tuple[Any, t.Path, str]] = []
    # Nested calls run through temporary tables, inner first (a deeper path): the outer call's
    # arguments then read the inner results, as any row-dependent argument would.
    for node, path in sorted(calls, key=lambda c: -len(c[1]) if id(c[0]) in nested else 0):
        if id(node) in nested:
            pending.append((node, path))
            continue
        b = bound[id(node)]
        in_from = len(path) >= 2 and t.is_node(path[-1].parent, ast.RangeFunction)
        row_args = any(t.row_dependent(a) for a in b.args.values())
        if (
            b.sig.setof
            and not (in_from or row_args or b.sig.is_table)
            and f"{b.sig.returns}[]" in TYPE_OIDS
        ):
            # A set-returning call with constant arguments in a select list (`DECLARE c CURSOR FOR
            # SELECT pgml.transform_stream(...)`, as the pgml SDK streams a chat): its rows,
            # computed once, become `unnest($n)`, which Postgres expands in the same position.
            next_param += 1
            plan.consts.append(ConstCall(collector.plan(b), next_param, f"{b.sig.returns}[]"))
            t.replace(path[-1], t.func("unnest", t.cast(t.param(next_param), f"{b.sig.returns}[]")))
            continue
        if b.sig.setof and not in_from and not _in_select_list(path):
            raise FeatureNotSupported(
                f"set-returning pgml.{b.sig.name} in this position is not supported",
                hint=f"call it in FROM: SELECT * FROM pgml.{b.sig.name}(...) or a LATERAL join",
            )
        if in_from or row_args or b.sig.setof:
            out = None if b.sig.setof else _stream_type(stmt, path, b)
            if out is not None and not in_from:
                streamed.append((node, path, out))
            else:
                pending.append((node, path))
            continue
        next_param += 1
        plan.consts.append(ConstCall(collector.plan(b), next_param, b.sig.returns))
        t.replace(path[-1], t.cast(t.param(next_param), b.sig.returns))
    if pending:
        Materialiser(plan, stmt, bound, collector).run(pending)
    if streamed:
        _rewrite_stream(plan, stmt, streamed, bound, collector)
    plan.sql = t.deparse(stmt)
    _finish_args(plan, collector)


def _in_select_list(path: t.Path) -> bool:
    """Whether a call stands in a SELECT's target list, where Postgres expands set-returning calls."""
    levels = [s for s in path if t.is_node(s.parent, t.STATEMENT_LEVELS)]
    return bool(levels) and t.is_node(levels[-1].parent, ast.SelectStmt) and levels[-1].attr == "targetList"


def _stream_type(stmt: Any, path: t.Path, b: BoundCall) -> str | None:
    """The client-visible type when the call can be streamed from the top SELECT list, else None."""
    if not t.is_node(stmt, ast.SelectStmt) or stmt.op != 0 or stmt.distinctClause or stmt.intoClause:
        return None
    if len(path) < 2 or path[0].parent is not stmt or path[0].attr != "targetList":
        return None
    casts = [s.parent for s in path[2:]]
    if not all(t.is_node(c, ast.TypeCast) and s.attr == "arg" for c, s in zip(casts, path[2:], strict=True)):
        return None
    if any(t.is_window(n) for a in b.args.values() for n, _ in t.walk(a)):
        return None
    # ORDER BY / GROUP BY naming an output column by number or name would then see the arguments.
    target = path[0].parent.targetList[path[0].index]
    for item in (stmt.sortClause or ()) + (stmt.groupClause or ()):
        expr = item.node if t.is_node(item, ast.SortBy) else item
        if t.is_node(expr, ast.A_Const):
            return None
        if t.is_node(expr, ast.ColumnRef) and len(expr.fields) == 1 and expr.fields[0].sval == target.name:
            return None
    out = _out_type(b.sig.returns, casts)  # type: ignore[arg-type]
    return out if out is None or out in TYPE_OIDS or out == "vector" else None


def _rewrite_stream(
    plan: StatementPlan,
    stmt: Any,
    streamed: list[tuple[Any, t.Path, str]],
    bound: dict[int, BoundCall],
    collector: ArgCollector,
) -> None:
    """Replace each streamed call's select-list entry by its row-dependent arguments."""
    by_target = {path[0].index: (node, out) for node, path, out in streamed}
    targets: list[Any] = []
    plan.stream = []
    for i, target in enumerate(stmt.targetList):
        if i not in by_target:
            targets.append(target)
            continue
        node, out = by_target[i]
        exprs: list[Any] = []
        call = collector.plan(bound[id(node)], exprs)  # nested calls are never streamed
        plan.stream.append(StreamCallPlan(call, target.name, out, len(exprs)))
        targets += [t.target(e, f"__pgml_{call.id}_{k}") for k, e in enumerate(exprs)]
    stmt.targetList = tuple(targets)


def _describe_sql(text: str, param_oids: Sequence[int]) -> str:
    """The statement with every pgml call replaced by a typed NULL: Describe's answer upstream."""
    stmt = parse_sql(text)[0].stmt
    _name_targets(stmt)
    for node, path in reversed(find_calls(stmt)):
        b = bind(node, param_oids)
        if len(path) >= 2 and t.is_node(path[-1].parent, ast.RangeFunction):
            rf = path[-1].parent
            cols = srf_columns(b, rf.alias)
            targets = [t.target(t.null_of(typ), name) for name, typ in cols]
            if rf.ordinality:
                targets.append(t.target(t.null_of("bigint"), "ordinality"))
            sub = ast.RangeSubselect(
                lateral=False,
                subquery=t.select(targets),
                alias=ast.Alias(aliasname=rf.alias.aliasname if rf.alias else b.sig.name),
            )
            t.replace(path[-3], sub)
        else:
            t.replace(path[-1], _null_keeping_params(b))
    return t.deparse(stmt)


def _value_type(b: BoundCall) -> str:
    """The type a call's value has where it stands outside FROM: a table function's row type."""
    return row_type(b.sig) if b.sig.is_table and b.sig.setof else b.sig.returns


def _null_keeping_params(b: BoundCall) -> Any:
    """A NULL of the call's type that still mentions the arguments holding a `$n`, each cast to
    its declared type: Postgres then infers those parameters' types when it describes."""
    declared = {a.name: a.type for a in b.sig.args}
    tests = [
        ast.NullTest(
            arg=t.cast(node, declared[name]) if declared.get(name) in TYPE_OIDS else node, nulltesttype=0
        )
        for name, node in b.args.items()
        if t.contains(node, lambda n: t.is_node(n, ast.ParamRef))
    ]
    null = t.null_of(_value_type(b))
    if not tests:
        return null
    return ast.CaseExpr(
        args=(ast.CaseWhen(expr=t.and_(tests), result=null),), defresult=t.null_of(_value_type(b))
    )
