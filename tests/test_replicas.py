"""Read replicas through the real proxy over real streaming replication (testing/replication.py).

A primary and two standbys made with pg_basebackup -R (their replay delayed on purpose, so a
read that reached a standby too early would miss the row it wrote), the proxy in transaction
pooling with `--replica` for each: reads run on a standby, writes and every pgml write function
on the primary, read-your-writes holds, and the destructive cases (a standby stopped under
load, the primary stopped and a standby promoted) each get a cluster of their own.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from testing.postgres import PgServer, free_port
from testing.proxy import ProxyProcess, start_proxy
from testing.replication import Cluster, promote, replay_caught_up, start_cluster, stop_fast

pytestmark = pytest.mark.slow

DELAY = "2s"
FAST: dict[str, Any] = {"health_check_interval": "0.3", "health_check_timeout": "1.0", "ban_time": "2"}


def _base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="pgml-test-repl-"))
    base.chmod(0o755)
    return base


def _proxy(cluster: Cluster, **overrides: Any) -> ProxyProcess:
    replicas = ",".join(s.dsn for s in cluster.standbys)
    return start_proxy(cluster.primary.dsn, "transaction", replicas=replicas, **{**FAST, **overrides})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = _base()
    c = start_cluster(base, standbys=2, delays=[DELAY, DELAY])
    try:
        c.primary.psql("CREATE EXTENSION IF NOT EXISTS vector")
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def proxied(cluster: Cluster) -> Iterator[ProxyProcess]:
    p = _proxy(cluster)
    yield p
    p.stop()
    shutil.rmtree(p.log_path.parent, ignore_errors=True)


def _connect(p: ProxyProcess) -> psycopg.Connection[Any]:
    return psycopg.connect(p.dsn(), autocommit=True, prepare_threshold=None)


def _caught_up(cluster: Cluster) -> None:
    for standby in cluster.standbys:
        replay_caught_up(cluster.primary, standby)


def _port_of(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT current_setting('port')").fetchone()[0])  # type: ignore[index]


def test_reads_run_on_a_standby_and_writes_on_the_primary(cluster: Cluster, proxied: ProxyProcess) -> None:
    standby_ports = {s.port for s in cluster.standbys}
    with _connect(proxied) as conn:
        rows = [conn.execute("SELECT pg_is_in_recovery(), current_setting('port')::int").fetchone()
                for _ in range(4)]
        assert all(r is not None and r[0] is True and r[1] in standby_ports for r in rows)
        assert {r[1] for r in rows if r} == standby_ports  # round-robin over both
        conn.execute("BEGIN READ ONLY")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        conn.execute("COMMIT")
        hinted = "/* pgml_proxy: route=primary */ SELECT pg_is_in_recovery()"
        assert conn.execute(hinted).fetchone() == (False,)
        conn.execute("CREATE TABLE IF NOT EXISTS rw (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO rw VALUES (1, 'a') ON CONFLICT DO NOTHING")
        conn.execute("CREATE SEQUENCE IF NOT EXISTS s")
        assert conn.execute("SELECT nextval('s') > 0").fetchone() == (True,)  # a write: the primary
        with conn.transaction():  # BEGIN not READ ONLY: the primary for the whole transaction
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            conn.execute("UPDATE rw SET v = 'b' WHERE id = 1")
        # After a write the delayed standbys lag: read-your-writes sends reads to the primary,
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        # unless the statement asks for a replica itself.
        hinted = "/* pgml_proxy: route=replica */ SELECT pg_is_in_recovery()"
        assert conn.execute(hinted).fetchone() == (True,)
    with psycopg.connect(proxied.dsn(), autocommit=True) as conn:  # simple protocol for the SET
        conn.pgconn.exec_(b"SET pgml_proxy.route = 'primary'")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        res = conn.pgconn.exec_(b"SET pgml_proxy.route = 'sideways'")
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"22023"
        conn.pgconn.exec_(b"RESET pgml_proxy.route")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        # never sent upstream: the servers have no such setting
        assert conn.execute("SELECT current_setting('pgml_proxy.route', true)").fetchone() == (None,)


def test_pgml_writes_land_on_the_primary_and_predict_reads_a_standby(
    cluster: Cluster, proxied: ProxyProcess,
) -> None:
    with _connect(proxied) as conn:
        assert conn.execute("SELECT * FROM pgml.load_dataset('iris')").fetchall() == [("pgml.iris", 150)]
        trained = conn.execute(
            "SELECT * FROM pgml.train('repl iris', 'classification', 'pgml.iris', 'target',"
            " algorithm => 'linear')").fetchall()
        assert trained and trained[0][0] == "repl iris"
        snap = conn.execute("SELECT * FROM pgml.snapshot('pgml.iris', 'target')").fetchall()
        assert len(snap) == 1
        joint = conn.execute(
            "SELECT * FROM pgml.train_joint('repl joint', 'regression', 'pgml.iris',"
            " ARRAY['sepal_length', 'sepal_width'], algorithm => 'linear')").fetchall()
        assert joint and joint[0][0] == "repl joint"
        deployed = conn.execute("SELECT * FROM pgml.deploy('repl iris', 'most_recent')").fetchall()
        assert deployed and deployed[0][0] == "repl iris"
        conn.execute("CREATE TABLE docs (id int, body text)")
        conn.execute("INSERT INTO docs VALUES (1, 'bread'), (2, 'space')")
    # Everything the runtime wrote is on the primary, and replicated.
    count = cluster.primary.psql("SELECT count(*) FROM pgml.models m JOIN pgml.projects p"
                                 " ON p.id = m.project_id WHERE p.name LIKE 'repl %'").strip()
    assert int(count) >= 2
    _caught_up(cluster)
    time.sleep(0.5)  # the health check sees the standbys' replay
    with _connect(proxied) as conn:
        predict = ("SELECT pg_is_in_recovery(), pgml.predict('repl iris', ARRAY[sepal_length, sepal_width,"
                   " petal_length, petal_width]) FROM pgml.iris")
        rows = conn.execute(predict + " WHERE target = 2").fetchall()
        assert len(rows) == 50 and all(r[0] is True for r in rows)  # read from a standby
        assert sum(r[1] == 2 for r in rows) > 40  # a model that learnt something
        embedded = conn.execute(
            "SELECT pg_is_in_recovery(), body, pgml.embed('all-MiniLM-L6-v2', body)::text FROM docs"
            " ORDER BY id").fetchall()
        assert [(r[0], r[1]) for r in embedded] == [(True, "bread"), (True, "space")]
        one = conn.execute("SELECT pgml.embed('all-MiniLM-L6-v2', 'bread')::text").fetchone()
        assert one is not None and embedded[0][2] == one[0] and len(one[0].split(",")) == 384
        # Ordered by the prediction, the planner fills temp tables: a standby cannot, the primary does.
        rows = conn.execute(predict + " ORDER BY 2 DESC LIMIT 3").fetchall()
        assert [r[0] for r in rows] == [False] * 3 and rows[0][1] == 2


def test_read_your_writes_with_delayed_replay(cluster: Cluster, proxied: ProxyProcess) -> None:
    with _connect(proxied) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ryw (id int)")
        _caught_up(cluster)
        time.sleep(0.5)
        for i in range(3):
            conn.execute("INSERT INTO ryw VALUES (%s)", (i,))
            assert conn.execute("SELECT count(*) FROM ryw WHERE id = %s", (i,)).fetchone() == (1,)
        # A replica that replays 2 s late would not have had the row: the read went to the primary.
        assert cluster.standbys[0].psql("SELECT count(*) FROM ryw WHERE id = 2").strip() == "0"
    # Once the standbys have replayed it, the same client reads from them again.
    _caught_up(cluster)
    time.sleep(0.8)
    with _connect(proxied) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


def test_session_pooling_routes_per_session(cluster: Cluster) -> None:
    replicas = ",".join(s.dsn for s in cluster.standbys)
    p = start_proxy(cluster.primary.dsn, "session", replicas=replicas, **FAST)
    try:
        with psycopg.connect(p.dsn(), autocommit=True) as conn:  # the primary by default
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        with psycopg.connect(p.dsn(options="-c%20pgml_proxy.route%3Dreplica"), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery(), pg_is_in_recovery()").fetchone() == (True, True)
        with pytest.raises(psycopg.OperationalError, match=r"pgml_proxy\.route"):
            psycopg.connect(p.dsn(options="-c%20pgml_proxy.route%3Dsideways"))
    finally:
        p.stop()
    t = _proxy(cluster)  # transaction pooling: the login's value is the client's setting
    try:
        with psycopg.connect(t.dsn(options="-c%20pgml_proxy.route%3Dprimary"), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    finally:
        t.stop()


def test_roles_come_from_the_servers_in_any_order(cluster: Cluster) -> None:
    # The "upstream" given is a standby and the primary is listed as a replica.
    replicas = ",".join([cluster.primary.dsn, cluster.standbys[1].dsn])
    p = start_proxy(cluster.standbys[0].dsn, "transaction", replicas=replicas, **FAST)
    try:
        with _connect(p) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS anyorder (id int)")
            conn.execute("INSERT INTO anyorder VALUES (1)")
            assert conn.execute("SELECT pg_is_in_recovery(), count(*) FROM anyorder").fetchone() == (False, 1)
        with _connect(p) as conn:  # a fresh client (nothing to read back): a standby
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        rows = {r["server"]: r["role"] for r in _admin_servers(p) if r["state"] == "health"}
        assert rows[f"127.0.0.1:{cluster.primary.port}"] == "primary"
        assert rows[f"127.0.0.1:{cluster.standbys[0].port}"] == "replica"
    finally:
        p.stop()


def test_read_your_writes_off_reads_the_lagging_standby(cluster: Cluster) -> None:
    p = _proxy(cluster, read_your_writes="false")
    try:
        with _connect(p) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS ryw_off (id int)")
            conn.execute("INSERT INTO ryw_off VALUES (1)")
            _caught_up(cluster)
            conn.execute("INSERT INTO ryw_off VALUES (2)")
            # the control: without read-your-writes the delayed standby misses the new row
            seen = conn.execute("SELECT count(*), bool_and(pg_is_in_recovery()) FROM ryw_off").fetchone()
            assert seen == (1, True)
    finally:
        p.stop()


def _admin_servers(p: ProxyProcess) -> list[dict[str, Any]]:
    with psycopg.connect(p.dsn(database="pgml_proxy"), autocommit=True) as admin:
        cur = admin.execute("SHOW SERVERS")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _load(p: ProxyProcess, stop: threading.Event, errors: list[str], done: list[int]) -> None:
    """A client running one-statement read transactions until `stop`, reconnecting after errors."""
    while not stop.is_set():
        try:
            with _connect(p) as conn:
                while not stop.is_set():
                    conn.execute("SELECT count(*) FROM pg_class").fetchone()
                    done.append(1)
        except psycopg.Error as exc:
            errors.append(exc.sqlstate or str(exc))
            time.sleep(0.05)


@pytest.fixture
def own_cluster() -> Iterator[Callable[[int], Cluster]]:
    made: list[tuple[Cluster, Path]] = []

    def make(standbys: int) -> Cluster:
        base = _base()
        made.append((start_cluster(base, standbys=standbys), base))
        return made[-1][0]

    yield make
    for c, base in made:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_standby_stopped_under_load_is_banned(own_cluster: Callable[[int], Cluster]) -> None:
    c = own_cluster(2)
    metrics_port = free_port()
    p = _proxy(c, ban_time="30", metrics_port=str(metrics_port))
    try:
        stop = threading.Event()
        errors: list[str] = []
        done: list[int] = []
        threads = [threading.Thread(target=_load, args=(p, stop, errors, done)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        gone: PgServer = c.standbys[0]
        stop_fast(gone)
        deadline = time.monotonic() + 20  # the health check bans it (about a second when quiet)
        while time.monotonic() < deadline and not any(
            r["server"] == f"127.0.0.1:{gone.port}" and r["banned"] == "true"
            for r in _admin_servers(p) if r["state"] == "health"
        ):
            time.sleep(0.2)
        time.sleep(0.5)  # transactions that were on it when it was banned have ended
        before = len(done)
        failed_before = len(errors)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        assert len(done) - before > 20  # the clients' next transactions succeed elsewhere
        assert len(errors) == failed_before, errors  # and none failed once it was banned
        # Before the ban: the standby's own 57P01/57P03, the proxy's class 08, or, for a client
        # whose transaction was on it as it went, the close a direct client of it would see.
        lost = ("08", "57P", "consuming input failed: server closed")
        assert all(e.startswith(lost) for e in errors), errors
        rows = {r["server"]: r for r in _admin_servers(p) if r["state"] == "health"}
        assert rows[f"127.0.0.1:{gone.port}"]["banned"] == "true"
        assert rows[f"127.0.0.1:{gone.port}"]["role"] == "down"
        assert rows[f"127.0.0.1:{c.standbys[1].port}"]["banned"] == "false"
        assert rows[f"127.0.0.1:{c.primary.port}"]["role"] == "primary"
        with _connect(p) as conn:
            assert _port_of(conn) == c.standbys[1].port
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert f'pgml_proxy_upstream_banned{{server="127.0.0.1:{gone.port}"}} 1.0' in text
        assert f'pgml_proxy_upstream_up{{role="primary",server="127.0.0.1:{c.primary.port}"}} 1.0' in text
        assert f'pgml_proxy_upstream_lag_bytes{{server="127.0.0.1:{c.standbys[1].port}"}}' in text
    finally:
        p.stop()


def test_failover_to_a_promoted_standby(own_cluster: Callable[[int], Cluster]) -> None:
    c = own_cluster(1)
    p = _proxy(c)
    try:
        with _connect(p) as conn:
            conn.execute("CREATE TABLE fo (id int)")
            conn.execute("INSERT INTO fo VALUES (1)")
            replay_caught_up(c.primary, c.standbys[0])
            conn.execute("BEGIN")
            conn.execute("INSERT INTO fo VALUES (2)")
            stop_fast(c.primary)  # the transaction in flight on it is lost, with a clear error
            with pytest.raises(psycopg.Error) as lost:
                conn.execute("INSERT INTO fo VALUES (3)")
            assert (lost.value.sqlstate or "08006")[:2] in ("08", "57")
        promote(c.standbys[0])
        promoted = time.monotonic()
        deadline = promoted + 10
        while True:  # new transactions write to the new primary, no proxy restart
            try:
                with _connect(p) as conn:
                    conn.execute("INSERT INTO fo VALUES (4)")
                    break
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert time.monotonic() - promoted < 3.0  # within a few health-check intervals (0.3 s)
        assert c.standbys[0].psql("SELECT array_agg(id ORDER BY id) FROM fo").strip() == "{1,4}"
        with _connect(p) as conn:
            assert conn.execute("SELECT pg_is_in_recovery(), count(*) FROM fo").fetchone() == (False, 2)
        # The runtime's own connections (registry writes) find the new primary too.
        deadline = time.monotonic() + 15
        while True:
            try:
                with _connect(p) as conn:
                    snap = conn.execute("SELECT * FROM pgml.snapshot('fo', 'id')").fetchall()
                    break
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert len(snap) == 1
        assert c.standbys[0].psql("SELECT count(*) FROM pgml.snapshots").strip() == "1"
    finally:
        p.stop()
