"""CREATE TABLE AS with pgml.embed makes a pgvector column; call forms Postgres refuses get its 42601."""

from __future__ import annotations

import pytest

from core.errors import ConfigError, PgError
from planner.analyze import analyze
from planner.handler import validate

CTAS = "CREATE TABLE te AS SELECT body, pgml.embed('m', body) AS embedding FROM docs"


def test_ctas_embedding_is_vector_by_default() -> None:
    [plan] = analyze(CTAS)
    assert plan.kind == "upstream"
    assert ") AS vector) AS embedding FROM docs" in plan.sql
    # The executor gives the column its dimensions once the rows exist.
    assert plan.vector_columns == [("te", "embedding")]
    [quoted] = analyze('CREATE TABLE "My T" AS SELECT pgml.embed(\'m\', body) AS "E 1" FROM docs')
    assert quoted.vector_columns == [('"My T"', '"E 1"')]
    # Without an alias the column takes the function's name, as Postgres names it.
    [bare] = analyze("CREATE TABLE te AS SELECT pgml.embed('m', body) FROM docs")
    assert bare.vector_columns == [("te", "embed")]
    assert bare.sql.endswith(") AS vector) AS embed FROM docs")


def test_ctas_embedding_keeps_real_array_when_configured() -> None:
    [plan] = analyze(CTAS, (), "real[]")
    assert "AS vector" not in plan.sql
    assert plan.sql.endswith(") AS embedding FROM docs")


def test_explicit_cast_and_plain_select_are_left_alone() -> None:
    [cast] = analyze("CREATE TABLE te AS SELECT pgml.embed('m', body)::real[] AS e FROM docs")
    assert "AS vector" not in cast.sql
    [select] = analyze("SELECT pgml.embed('m', body) AS e FROM docs")
    assert "vector" not in select.sql


def test_ctas_setting_is_validated() -> None:
    assert validate({})["ctas_embedding_type"] == "vector"
    with pytest.raises(ConfigError, match=r"planner\.ctas_embedding_type"):
        validate({"ctas_embedding_type": "float8[]"})


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT * FROM pgml.train('p', algorithm => 'xgboost', 'classification', 'pgml.digits', 'target')",
         "positional argument cannot follow named argument"),
        ("SELECT pgml.embed(transformer => 'm', transformer => 'n', text => 'x')",
         'argument name "transformer" used more than once'),
    ],
)
def test_call_forms_postgres_refuses(sql: str, message: str) -> None:
    with pytest.raises(PgError) as err:
        analyze(sql)
    assert err.value.sqlstate == "42601"
    assert err.value.message == message
