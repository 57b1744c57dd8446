"""Pure planner tests: SQL in, plan and rewritten SQL out (no I/O)."""

from __future__ import annotations

import pytest

from core.errors import FeatureNotSupported, PgError, SyntaxError_, UndefinedFunction
from planner.analyze import analyze
from planner.catalog import SIGNATURES
from planner.plan import ClientParam, Evaluated, Literal, RowColumn

E = "pgml.embed('m', body)"
# (sql, kind, [(field, fragment that must appear)], number of consts, number of temp steps, streamed calls)
CASES: list[tuple[str, str, list[tuple[str, str]], int, int, int]] = [
    # answered locally
    ("SELECT pgml.embed('m', 'hello')", "local", [], 0, 0, 0),
    ("select pgml.embed(transformer => 'm', text => 'hi')", "local", [], 0, 0, 0),
    ("SELECT pgml.embed('m', 'a'), pgml.embed('m', 'b') AS second", "local", [], 0, 0, 0),
    ("SELECT pgml.embed('m', 'hi')::vector", "local", [], 0, 0, 0),
    ("SELECT pgml.embed('m', 'hi', '{\"normalize\": true}'::jsonb)", "local", [], 0, 0, 0),
    ("SELECT pgml.transform('text-classification', inputs => ARRAY['I love it'])", "local", [], 0, 0, 0),
    ("SELECT pgml.transform('{\"task\": \"summarization\"}'::jsonb, '{}', ARRAY['x'])", "local", [], 0, 0, 0),
    ("SELECT pgml.predict('iris', ARRAY[1.0, 2.0, 3.0, 4.0])", "local", [], 0, 0, 0),
    ("SELECT pgml.predict(7, ARRAY[1, 2])", "local", [], 0, 0, 0),
    ("SELECT pgml.predict_proba('iris', ARRAY[1.0, 2.0]::real[])", "local", [], 0, 0, 0),
    ("SELECT * FROM pgml.train('p', 'regression', 'pgml.iris', 'target')", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.train(project_name => 'p', algorithm => 'xgboost')", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.chunk('recursive_character', 'a b c')", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.chunk('character', 'a b') AS c(i, piece)", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.embed('m', ARRAY['a', 'b'])", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.rank('m', 'q', ARRAY['a', 'b'])", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.deploy('p', 'best_score')", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.load_dataset('iris')", "local_table", [], 0, 0, 0),
    ("SELECT * FROM pgml.snapshot('pgml.iris', 'target')", "local_table", [], 0, 0, 0),
    ("SELECT pgml.embed('m', ARRAY['a', 'b'])", "local", [], 0, 0, 0),
    ("SELECT pgml.embed('m', $1)", "local", [], 0, 0, 0),
    ("SELECT pgml.embed('m', lower('HI'))", "local", [("eval_sql", "lower('HI')")], 0, 0, 0),
    # constants inlined as typed parameters
    (
        "SELECT id FROM docs ORDER BY embedding <=> pgml.embed('m', 'q')::vector LIMIT 5",
        "upstream",
        [("sql", "CAST($1 AS real[]) AS vector")],
        1,
        0,
        0,
    ),
    (
        "SELECT id FROM docs WHERE pgml.predict('p', ARRAY[1, 2]) > score",
        "upstream",
        [("sql", "CAST($1 AS real) > score")],
        1,
        0,
        0,
    ),
    (
        "SELECT id FROM docs LIMIT pgml.predict('p', ARRAY[1, 2])::int",
        "upstream",
        [("sql", "LIMIT")],
        1,
        0,
        0,
    ),
    (
        "INSERT INTO docs (id, e) VALUES (1, pgml.embed('m', 'x'))",
        "upstream",
        [("sql", "VALUES (1, CAST($1 AS real[]))")],
        1,
        0,
        0,
    ),
    ("INSERT INTO docs (id, e) VALUES ($1, pgml.embed('m', $2))", "upstream", [("sql", "$3")], 1, 0, 0),
    (
        "UPDATE docs SET e = pgml.embed('m', 'x') WHERE id = 1",
        "upstream",
        [("sql", "SET e = CAST($1")],
        1,
        0,
        0,
    ),
    ("SELECT id, 1 + pgml.predict('p', ARRAY[1]) FROM docs", "upstream", [("sql", "1 + CAST($1")], 1, 0, 0),
    (
        "SELECT id FROM docs WHERE body = pgml.transform('x', inputs => ARRAY['a'])->>0",
        "upstream",
        [("sql", "jsonb)")],
        1,
        0,
        0,
    ),
    ("DELETE FROM docs WHERE e <-> pgml.embed('m', 'x')::vector < 1", "upstream", [], 1, 0, 0),
    # streamed select lists
    (
        f"SELECT id, {E} FROM docs",
        "upstream",
        [("sql", "CAST(body AS pg_catalog.text) AS __pgml_1_0")],
        0,
        0,
        1,
    ),
    (f"SELECT {E} AS e FROM docs WHERE id > $1 ORDER BY id", "upstream", [("sql", "WHERE id > $1")], 0, 0, 1),
    (f"SELECT *, {E}::vector FROM docs", "upstream", [("describe_sql", "AS vector) AS embed")], 0, 0, 1),
    (
        "SELECT pgml.predict('p', ARRAY[a, b]) FROM t",
        "upstream",
        [("sql", "ARRAY[a, b] AS __pgml_1_0")],
        0,
        0,
        1,
    ),
    ("SELECT pgml.predict('p', t.*) FROM t", "upstream", [("sql", "to_jsonb(t.*)")], 0, 0, 1),
    ("SELECT pgml.predict('p', (a, b)) FROM t", "upstream", [("sql", "to_jsonb(")], 0, 0, 1),
    ("SELECT pgml.predict(model_id, ARRAY[a]) FROM t", "upstream", [], 0, 0, 1),
    (f"SELECT id, {E}, pgml.embed('m2', title) FROM docs", "upstream", [("sql", "__pgml_2_0")], 0, 0, 2),
    ("SELECT cat, pgml.embed('m', string_agg(body, ' ')) FROM docs GROUP BY cat", "upstream", [], 0, 0, 1),
    (f"SELECT id, {E} FROM docs LIMIT 10", "upstream", [("sql", "LIMIT 10")], 0, 0, 1),
    ("SELECT pgml.embed('m', body, '{\"scale\": 2}') FROM docs", "upstream", [], 0, 0, 1),
    # materialised and joined back
    (f"UPDATE docs SET e = {E} WHERE id < 10", "upstream", [("sql", "pg_temp.pgml_k1")], 0, 1, 0),
    (f"UPDATE docs d SET e = {E} FROM other o WHERE o.id = d.id", "upstream", [], 0, 1, 0),
    (f"INSERT INTO t2 SELECT id, {E} FROM docs", "upstream", [("sql", "INSERT INTO t2")], 0, 1, 0),
    (f"CREATE TABLE t3 AS SELECT id, {E} FROM docs", "upstream", [("sql", "CREATE TABLE t3")], 0, 1, 0),
    (f"SELECT id FROM docs WHERE {E} IS NOT NULL", "upstream", [], 0, 1, 0),
    ("SELECT id FROM t WHERE pgml.predict('p', ARRAY[a, b]) > 0.5 AND a > 1", "upstream", [], 0, 1, 0),
    (f"SELECT id FROM docs ORDER BY {E} <-> '[1,2]'", "upstream", [], 0, 1, 0),
    (f"SELECT id, {E} FROM docs ORDER BY 2", "upstream", [], 0, 1, 0),
    (f"SELECT DISTINCT {E} FROM docs", "upstream", [], 0, 1, 0),
    ("SELECT pgml.predict('p', ARRAY[a]) AS p, count(*) FROM t GROUP BY 1", "upstream", [], 0, 1, 0),
    ("SELECT * FROM a JOIN b ON pgml.predict('p', ARRAY[a.x, b.y]) > 0", "upstream", [], 0, 1, 0),
    (f"WITH x AS (SELECT id, {E} AS e FROM docs) SELECT * FROM x", "upstream", [], 0, 1, 0),
    (f"SELECT * FROM (SELECT id, {E} AS e FROM docs) s WHERE id > 1", "upstream", [], 0, 1, 0),
    (
        "SELECT id FROM docs WHERE id IN (SELECT id FROM docs d2 WHERE pgml.predict('p', ARRAY[d2.id]) > 1)",
        "upstream",
        [],
        0,
        1,
        0,
    ),
    (f"SELECT {E} FROM docs UNION ALL SELECT {E} FROM docs", "upstream", [("sql", "pgml_k2")], 0, 2, 0),
    (
        "SELECT d.id, c.* FROM docs d, LATERAL pgml.chunk('character', d.body) c",
        "upstream",
        [("sql", "LATERAL (SELECT")],
        0,
        1,
        0,
    ),
    (
        "SELECT d.id, c.chunk FROM docs d "
        "CROSS JOIN LATERAL pgml.chunk('character', d.body) WITH ORDINALITY c",
        "upstream",
        [("sql", "AS ordinality")],
        0,
        1,
        0,
    ),
    ("SELECT * FROM docs d, pgml.embed('m', ARRAY['a', 'b']) e", "upstream", [("sql", "pgml_r1")], 0, 1, 0),
    ("SELECT x.* FROM pgml.rank('m', 'q', ARRAY['a', 'b']) x WHERE x.score > 0", "upstream", [], 0, 1, 0),
    (f"EXPLAIN SELECT id, {E} FROM docs", "explain", [("explain_sql", "EXPLAIN SELECT id")], 0, 0, 1),
    (f"EXPLAIN (ANALYZE) UPDATE docs SET e = {E}", "explain", [], 0, 1, 0),
    # statements the planner leaves alone
    ("SELECT pgml.cosine_similarity(ARRAY[1,2]::real[], ARRAY[2,3]::real[])", "passthrough", [], 0, 0, 0),
    ("SELECT * FROM pgml.models", "passthrough", [], 0, 0, 0),
    ("SELECT pgml.version()", "passthrough", [], 0, 0, 0),
    ("SELECT 'pgml.embed(''m'', body)' AS text_only", "passthrough", [], 0, 0, 0),
]


@pytest.mark.parametrize(("sql", "kind", "fragments", "consts", "steps", "streamed"), CASES)
def test_plan(
    sql: str, kind: str, fragments: list[tuple[str, str]], consts: int, steps: int, streamed: int
) -> None:
    (plan,) = analyze(sql)
    assert plan.kind == kind
    for field, fragment in fragments:
        assert fragment in (getattr(plan, field) or ""), (field, getattr(plan, field))
    assert len(plan.consts) == consts
    assert len(plan.steps) == steps
    assert len(plan.stream or []) == streamed
    if kind not in ("passthrough", "local", "local_table"):
        assert (
            "pgml.embed" not in plan.sql and "pgml.predict" not in plan.sql and "pgml.chunk" not in plan.sql
        )


def test_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60


def test_argument_sources() -> None:
    (plan,) = analyze("SELECT id, pgml.embed('m', body, '{\"scale\": 2}'::jsonb) FROM docs")
    assert plan.stream is not None
    sources = plan.stream[0].call.sources
    assert sources == {"transformer": Literal("m"), "text": RowColumn(0), "kwargs": Literal({"scale": 2})}
    (plan,) = analyze("SELECT pgml.embed('m', $1)", [0])
    assert plan.local is not None and plan.local[0].call.sources["text"] == ClientParam(1, "text")
    (plan,) = analyze("SELECT pgml.embed('m', upper($1))", [25])
    assert plan.local is not None and plan.local[0].call.sources["text"] == Evaluated(0)
    assert plan.eval_sql == "SELECT CAST(upper($1) AS pg_catalog.text) AS a0"


def test_overloads() -> None:
    (plan,) = analyze("SELECT * FROM pgml.embed('m', inputs => ARRAY['a'])")
    assert plan.local is not None and plan.local[0].call.sig.setof
    (plan,) = analyze("SELECT pgml.embed('m', 'a')")
    assert plan.local is not None and not plan.local[0].call.sig.setof
    (plan,) = analyze("SELECT * FROM pgml.deploy(12)")
    assert plan.local is not None and [a.name for a in plan.local[0].call.sig.args] == ["model_id"]
    (plan,) = analyze("SELECT pgml.embed('m', 'a')")
    assert plan.local is not None and plan.local[0].call.defaults == {"kwargs": {}}


def test_user_text_never_changes_the_statement() -> None:
    evil = "x'); DROP TABLE docs; --"
    (plan,) = analyze(
        f"SELECT id FROM docs ORDER BY e <-> pgml.embed('m', '{evil.replace(chr(39), chr(39) * 2)}')"
    )
    assert "DROP" not in plan.sql
    assert plan.consts[0].call.sources["text"] == Literal(evil)


@pytest.mark.parametrize(
    ("sql", "error", "words"),
    [
        ("SELECT pgml.embed('m')", UndefinedFunction, "missing argument"),
        ("SELECT pgml.embed('m', 'a', '{}', 'extra')", UndefinedFunction, "too many"),
        ("SELECT pgml.embed(model => 'm', text => 'a')", UndefinedFunction, "no argument named"),
        ("SELECT pgml.embed('m', body) OVER () FROM docs", UndefinedFunction, "window"),
        ("CREATE VIEW v AS SELECT pgml.embed('m', body) FROM docs", FeatureNotSupported, "ViewStmt"),
        ("CREATE INDEX ON docs ((pgml.embed('m', body)))", FeatureNotSupported, "IndexStmt"),
        ("COPY docs FROM STDIN WHERE pgml.predict('p', ARRAY[id]) > 0", FeatureNotSupported, "COPY ... FROM"),
        ("SELECT id FROM docs WHERE pgml.chunk('x', body) IS NOT NULL", FeatureNotSupported, "set-returning"),
        (
            "SELECT pgml.rank('m', 'q', ARRAY(SELECT chunk FROM pgml.chunk('c', body))) FROM docs",
            FeatureNotSupported,
            "in FROM inside",
        ),
        ("INSERT INTO t SELECT 1 RETURNING pgml.embed('m', body)", FeatureNotSupported, "returningClause"),
        ("SELEC pgml.embed('m', 'x')", SyntaxError_, "syntax"),
    ],
)
def test_errors(sql: str, error: type[PgError], words: str) -> None:
    with pytest.raises(error) as info:
        analyze(sql)
    assert words in info.value.message
    if error is UndefinedFunction:
        assert "pgml.embed(transformer text" in info.value.fields["H"]
        assert info.value.fields["C"] == "42883"


def test_catalog_covers_the_reference() -> None:
    names = {s.name for s in SIGNATURES}
    assert names >= {
        "transform",
        "transform_stream",
        "embed",
        "rank",
        "chunk",
        "train",
        "train_joint",
        "snapshot",
        "predict",
        "predict_proba",
        "predict_joint",
        "predict_batch",
        "decompose",
        "deploy",
        "load_dataset",
        "tune",
        "generate",
    }


def test_several_statements_keep_their_text() -> None:
    plans = analyze(
        "SELECT 1; SELECT pgml.embed('m', 'x');  CAST(x AS \"bit\")".replace("  CAST", " SELECT CAST")
    )
    assert [p.kind for p in plans] == ["passthrough", "local", "passthrough"]
    assert plans[2].text == 'SELECT CAST(x AS "bit")'


def test_declare_cursor_materialises_into_tables_of_its_transaction() -> None:
    [plain] = analyze("DECLARE c CURSOR FOR SELECT id, pgml.embed('m', body) FROM docs")
    [held] = analyze("DECLARE h CURSOR WITH HOLD FOR SELECT pgml.embed('m', body) FROM docs")
    assert (plain.cursor, plain.cursor_hold) == ("c", False)
    assert (held.cursor, held.cursor_hold) == ("h", True)
    for plan in (plain, held):
        assert plan.stream is None and len(plan.steps) == 1  # no streaming: FETCH reads upstream
        step = plan.steps[0]
        assert step.create_keys is not None and " ON COMMIT DROP AS " in step.create_keys
        assert step.create_results.endswith(" ON COMMIT DROP")
        assert plan.sql.startswith(f"DECLARE {plan.cursor} ")
    # Named per statement, so two cursors of one transaction never share their tables.
    assert plain.steps[0].keys != held.steps[0].keys
    [ordinary] = analyze("SELECT id FROM docs WHERE pgml.embed('m', body) IS NOT NULL")
    assert ordinary.cursor is None and ordinary.steps[0].keys == "pgml_k1"
