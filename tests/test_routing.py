"""proxy/routing.py without I/O: a table of statements and the server each is sent to; and
proxy/replicas.py's choice among servers (balancing, bans, read-your-writes, a new primary)
from health-check findings set by hand, and the replica settings."""

from __future__ import annotations

from collections import Counter

import pytest
from psycopg.conninfo import conninfo_to_dict

from core.errors import ConfigError
from proxy import routing
from proxy.backend import Target
from proxy.config import load
from proxy.replicas import Upstreams, parse_lsn, runtime_dsn
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
    assert routing.route("\n\n          /* pgml_proxy: route=primary */ select 1") == (P, True)
    assert routing.route("select 1", "replica") == (R, True)
    assert routing.route("select 1") == (R, False)


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


# --- proxy/replicas.py's choice among servers (no I/O: the health checks' findings set by hand) ---
def _upstreams(balancing: str = "round_robin", weights: tuple[int, ...] = (1, 1),
               primary_reads: bool = False) -> Upstreams:
    replicas = [(Target("127.0.0.1", 5001 + i, "u", None, "d"), w) for i, w in enumerate(weights)]
    ups = Upstreams(Target("127.0.0.1", 5000, "u", None, "d"), replicas, interval=1, timeout=1,
                    max_lag=100, ban_time=60, balancing=balancing, primary_reads=primary_reads)
    for node in ups.nodes[1:]:
        node.role, node.lsn = "replica", 1000
    return ups


def _picks(ups: Upstreams, n: int, min_lsn: int = 0, load: dict[int, int] | None = None) -> Counter[int]:
    loads = load or {}
    return Counter(ups.choose(R, min_lsn, lambda node: loads.get(node.target.port, 0)).target.port
                   for _ in range(n))


def test_replicas_are_balanced_by_weight() -> None:
    assert _picks(_upstreams(weights=(2, 1)), 300) == {5001: 200, 5002: 100}
    assert _picks(_upstreams(primary_reads=True), 300) == {5000: 100, 5001: 100, 5002: 100}
    randomly = _picks(_upstreams("random", weights=(3, 1)), 2000)
    assert set(randomly) == {5001, 5002} and randomly[5001] > 2 * randomly[5002]
    least = _upstreams("least_connections")
    assert _picks(least, 10, load={5001: 5, 5002: 1}) == {5002: 10}
    assert _picks(least, 10) == {5001: 5, 5002: 5}  # ties take turns


def test_bans_lag_and_read_your_writes_leave_replicas_out() -> None:
    ups = _upstreams()
    assert ups.choose(P, 0, lambda n: 0) is ups.primary
    ups.ban(ups.nodes[1], "test")
    assert _picks(ups, 4) == {5002: 4}
    ups.ban(ups.primary, "the primary is never banned")
    assert not ups.primary.banned()
    ups.nodes[2].role = "down"
    assert _picks(ups, 2) == {5000: 2}  # none left: the primary reads
    fresh = _upstreams()
    fresh.nodes[1].lsn = 2000
    assert _picks(fresh, 3, min_lsn=1500) == {5001: 3}  # only the one that replayed the commit
    assert _picks(fresh, 3, min_lsn=3000) == {5000: 3}


def test_a_promoted_standby_becomes_the_primary() -> None:
    ups = _upstreams()
    ups.primary.role = "down"
    ups.nodes[2].role, ups.nodes[2].lsn = "primary", 5000
    ups._find_primary()
    assert ups.primary is ups.nodes[2]
    assert ups.choose(P, 0, lambda n: 0).target.port == 5002
    assert _picks(ups, 2) == {5001: 2}


def test_replica_settings_are_checked() -> None:
    ok = load(None, {"replicas": ["postgresql://a/db", "postgresql://b/db"], "replica_weights": [3]}, {})
    assert ok.weights == (3,) and ok.load_balancing == "round_robin" and ok.read_your_writes
    env = load(None, {}, {"PGML_PROXY_REPLICAS": "postgresql://a/db,postgresql://b/db"})
    assert env.replicas == ("postgresql://a/db", "postgresql://b/db")
    for bad, key in (({"load_balancing": "fastest"}, "proxy.load_balancing"),
                     ({"replicas": ["x"], "replica_weights": [0]}, "proxy.replica_weights"),
                     ({"replica_weights": [1]}, "proxy.replica_weights"),
                     ({"ban_time": 0}, "proxy.ban_time")):
        with pytest.raises(ConfigError) as err:
            load(None, bad, {})
        assert err.value.key == key


def test_runtime_dsn_lists_every_server_for_the_primary() -> None:
    dsn = runtime_dsn("postgresql://u:pw@p:5432/app", ["postgresql://u@r1:5433/app", "host=r2 port=5434"])
    parts = conninfo_to_dict(dsn)
    assert (parts["host"], parts["port"], parts["target_session_attrs"]) == ("p,r1,r2", "5432,5433,5434",
                                                                           "read-write")
    assert (parts["user"], parts["password"], parts["dbname"]) == ("u", "pw", "app")
    assert runtime_dsn("postgresql://p/app", []) == "postgresql://p/app"
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
