"""proxy/routing.py without I/O: a table of statements and the server each is sent to."""

from __future__ import annotations

import pytest

from proxy import routing
from proxy.routing import Dest

P, R = Dest.PRIMARY, Dest.REPLICA

CASES = [
    # plain reads
    ("select 1", R),
    ("SELECT * FROM t WHERE a = $1", R),
    ("   \n\tselect 1", R),
    ("((select 1))", R),
    ("-- a comment\nselect 1", R),
    ("/* block */ SELECT 1", R),
    ("values (1), (2)", R),
    ("TABLE t", R),
    ("show search_path", R),
    ("with x as (select 1) select * from x", R),
    ("select 'delete from t' as s", R),  # a write word in a literal: the parser says it reads
    ("select * from shares", R),
    ("select updated_at from t", R),
    ("explain select 1", R),
    # reads that write
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", P),
    ("with x as (insert into t values (1) returning *) select 1", P),
    ("SELECT nextval('s')", P),
    ("select setval('s', 1)", P),
    ("select pg_current_wal_lsn()", P),
    ("select pg_notify('c', 'x')", P),
    ("select * from t into u", P),
    ("select a into new_table from t", P),
    ("select * from t for update", P),
    ("SELECT * FROM t FOR NO KEY UPDATE", P),
    ("select * from t for share", P),
    ("select * from t for key share skip locked", P),
    ("select 1; delete from t", P),
    ("select 1; select 2", R),
    # pgml: model work in the proxy reads, registry writes go to the primary
    ("SELECT * FROM pgml.train('p', 'regression', 't', 'y')", P),
    ("select pgml.train_joint('p', 'regression', 't', ARRAY['y'])", P),
    ("SELECT * FROM pgml.tune('p', task => 'conversation')", P),
    ("select * from pgml.snapshot('t', 'y')", P),
    ("select pgml.deploy('p', 'best_score')", P),
    ("SELECT * FROM pgml.load_dataset('iris')", P),
    ("select pgml.predict('p', array[1, 2])", R),
    ("select pgml.embed('m', body) from docs", R),
    ("select pgml.transform(task => 'x', inputs => array['a'])", R),
    ("select train from trains", R),  # a column called train is no call
    # transactions
    ("BEGIN", P),
    ("begin read only", R),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", R),
    ("start transaction read only", R),
    ("begin read write", P),
    ("START TRANSACTION", P),
    ("begin read only; insert into t values (1)", P),
    # everything else
    ("insert into t values (1)", P),
    ("UPDATE t SET a = 1", P),
    ("delete from t", P),
    ("create table t (a int)", P),
    ("EXPLAIN ANALYZE DELETE FROM t", P),
    ("explain delete from t", P),
    ("SET work_mem = '1MB'", P),
    ("copy t to stdout", P),
    ("", P),
    ("selec 1 from", P),  # unparsable: the primary gives the error
    ("with broken as (", R),  # a read by its words: a standby gives the same syntax error
    ("with broken as (delete", P),
]


@pytest.mark.parametrize(("sql", "dest"), CASES)
def test_classify(sql: str, dest: Dest) -> None:
    assert routing.classify(sql) is dest


def test_pgml_writers_come_from_the_declarations() -> None:
    assert routing.pgml_writers() == {"train", "train_joint", "tune", "snapshot", "deploy", "load_dataset"}


def test_comment_hint_session_setting_and_open_transaction() -> None:
    assert routing.decide("/* pgml_proxy: route=primary */ select 1") is P
    assert routing.decide("/*pgml_proxy:route=replica*/ select nextval('s')") is R
    assert routing.decide("/* pgml_proxy: route=auto */ select 1", setting="primary") is P
    assert routing.decide("/* pgml_proxy: route=bogus */ select 1") is R
    assert routing.decide("select 1", setting="primary") is P
    assert routing.decide("insert into t values (1)", setting="replica") is R
    assert routing.decide("select 1", transaction=P) is P
    assert routing.decide("select 1", setting="auto", transaction=R) is R
    assert routing.hint("select 1 /* pgml_proxy: route=primary */") is None  # leading only


@pytest.mark.parametrize(("sql", "value"), [
    ("SET pgml_proxy.route = 'primary'", "primary"),
    ("set pgml_proxy.route to replica", "replica"),
    ("SET SESSION pgml_proxy.route = \"auto\";", "auto"),
    ("  set pgml_proxy.route='nonsense'", "nonsense"),
    ("RESET pgml_proxy.route", "auto"),
    ("set work_mem = '1MB'", None),
    ("SET pgml_proxy.route = 'primary'; select 1", None),  # not alone: the upstream answers it
    ("select 'SET pgml_proxy.route = primary'", None),
])
def test_route_setting(sql: str, value: str | None) -> None:
    assert routing.route_setting(sql) == value


def test_classification_is_cached_by_text() -> None:
    routing.classify.cache_clear()
    for _ in range(3):
        routing.classify("select 42")
    info = routing.classify.cache_info()
    assert (info.hits, info.misses, info.maxsize) == (2, 1, routing.CACHE_SIZE)
