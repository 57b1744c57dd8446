"""Tabular flows in SQL through the real pgml-proxy (CLI subprocess) with psycopg.

The registry lives in the proxy's upstream database, so a model trained through one
proxy is served by a second instance and after a restart, and a deploy made through
one instance is what the others predict with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.fix_postgres import PgServer
from tests.fix_proxy import ProxyProcess
from tests.test_tabular_support import new_database

pytestmark = pytest.mark.slow
SETOSA = "ARRAY[5.1, 3.5, 1.4, 0.2]"


def rows(
    proxy: ProxyProcess, database: str, sql: str, notes: list[str] | None = None
) -> list[tuple[Any, ...]]:
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as conn:
        if notes is not None:
            conn.add_notice_handler(lambda d: notes.append(f"{d.severity}: {d.message_primary}"))
        return conn.execute(sql).fetchall()


def test_train_predict_deploy_across_proxies(
    pg_server: PgServer, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    dsn = new_database(pg_server, "tabular_proxy")
    db = dsn.rsplit("/", 1)[1]
    first = proxy_factory("session", upstream=dsn)
    assert rows(first, db, "SELECT * FROM pgml.load_dataset('iris')") == [("pgml.iris", 150)]
    notes: list[str] = []
    trained = rows(
        first, db, "SELECT * FROM pgml.train('sql iris', 'classification', 'pgml.iris', 'target')", notes
    )
    assert trained == [("sql iris", "classification", "linear", True)]
    assert any(n.startswith("INFO: training linear") for n in notes)
    assert rows(first, db, f"SELECT pgml.predict('sql iris', {SETOSA})") == [(0.0,)]
    [(accuracy,)] = rows(
        first,
        db,
        "SELECT avg((target = pgml.predict('sql iris', ARRAY[sepal_length,"
        " sepal_width, petal_length, petal_width]))::int)::float8 FROM pgml.iris",
    )
    assert accuracy >= 0.9
    # The row forms: a table row (names) and an anonymous ROW (positions).
    assert (
        rows(
            first,
            db,
            "SELECT pgml.predict('sql iris', t.*) = t.target FROM pgml.iris t"
            " WHERE t.petal_length < 1.5 LIMIT 3",
        )
        == [(True,)] * 3
    )
    assert rows(first, db, "SELECT pgml.predict('sql iris', ROW(6.7, 3.0, 5.2, 2.3))") == [(2.0,)]
    with psycopg.connect(first.dsn(database=db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedObject, match="no such project"):
            conn.execute(f"SELECT pgml.predict('no such project', {SETOSA})")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="2 elements"):
            conn.execute("SELECT pgml.predict('sql iris', ARRAY[1.0, 2.0])")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # still usable

    # A second model, not deployed; a second proxy then serves and deploys it.
    rows(
        first,
        db,
        "SELECT * FROM pgml.train('sql iris', algorithm => 'xgboost',"
        " hyperparams => '{\"n_estimators\": 5}', automatic_deploy => false)",
    )
    second = proxy_factory("session", upstream=dsn)
    assert rows(second, db, f"SELECT pgml.predict_proba('sql iris', {SETOSA})") == rows(
        first, db, f"SELECT pgml.predict_proba('sql iris', {SETOSA})"
    )
    [(new_id,)] = rows(second, db, "SELECT max(id) FROM pgml.models")
    assert rows(second, db, f"SELECT * FROM pgml.deploy({new_id})") == [("sql iris", "specific", "xgboost")]
    # `first` cached the old deployment; the NOTIFY from `second` makes it switch.
    want = rows(second, db, f"SELECT pgml.predict_proba('sql iris', {SETOSA})")
    deadline = time.monotonic() + 10
    while rows(first, db, f"SELECT pgml.predict_proba('sql iris', {SETOSA})") != want:
        assert time.monotonic() < deadline, "the deploy through the second proxy was not seen by the first"
        time.sleep(0.05)
    first.stop()
    restarted = proxy_factory("session", upstream=dsn)
    assert rows(restarted, db, f"SELECT pgml.predict_proba('sql iris', {SETOSA})") == want
    assert rows(restarted, db, "SELECT name, algorithm FROM pgml.deployed_models") == [
        ("sql iris", "xgboost")
    ]


def test_training_reads_only_what_the_client_may_read(
    pg_server: PgServer, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    # The runtime reads training data on its own connection (the proxy's role): the client's
    # role must still be allowed to SELECT the relation, as it would be for the data itself.
    dsn = new_database(pg_server, "tabular_privileges")
    db = dsn.rsplit("/", 1)[1]
    role = f"analyst_{db[-10:]}"
    with psycopg.connect(dsn, autocommit=True) as owner:
        owner.execute(f"CREATE ROLE {role} LOGIN")
        owner.execute("CREATE TABLE salaries (age float8, salary float8)")
        owner.execute("INSERT INTO salaries SELECT g, g * 1000 FROM generate_series(20, 60) g")
        owner.execute(f"REVOKE ALL ON salaries FROM {role}")
    proxy = proxy_factory("session", upstream=dsn)
    train = "SELECT * FROM pgml.train('pay', 'regression', 'salaries', 'salary')"
    with psycopg.connect(proxy.dsn(database=db, user=role), autocommit=True) as conn:
        # What Postgres itself answers the role for the data:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM salaries")
        for sql in (train, "SELECT * FROM pgml.snapshot('salaries', 'salary')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                conn.execute(sql)
            assert err.value.sqlstate == "42501"
            assert "permission denied for table salaries" in str(err.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection stays usable
    with psycopg.connect(dsn, autocommit=True) as owner:
        # Nothing was recorded by the refused calls.
        assert owner.execute("SELECT count(*) FROM pgml.projects WHERE name = 'pay'").fetchone() == (0,)
        assert owner.execute("SELECT count(*) FROM pgml.snapshots").fetchone() == (0,)
        owner.execute(f"GRANT SELECT ON salaries TO {role}")
        # Row-level security: the role sees some rows only, and the proxy's read would see all.
        owner.execute("ALTER TABLE salaries ENABLE ROW LEVEL SECURITY")
        owner.execute(f"CREATE POLICY young ON salaries FOR SELECT TO {role} USING (age < 30)")
    with psycopg.connect(proxy.dsn(database=db, user=role), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM salaries").fetchone() == (10,)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="row-level security"):
            conn.execute(train)
    with psycopg.connect(dsn, autocommit=True) as owner:
        owner.execute("ALTER TABLE salaries DISABLE ROW LEVEL SECURITY")
    with psycopg.connect(proxy.dsn(database=db, user=role), autocommit=True) as conn:
        assert conn.execute(train).fetchall() == [("pay", "regression", "linear", True)]


def test_load_dataset_belongs_to_the_client(
    pg_server: PgServer, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    # As with PostgresML, where the caller creates the table: a client's loaded dataset is its
    # own (it can read it and train on it), and another role may not replace it.
    dsn = new_database(pg_server, "tabular_owner")
    db = dsn.rsplit("/", 1)[1]
    alice, bob = f"alice_{db[-10:]}", f"bob_{db[-10:]}"
    with psycopg.connect(dsn, autocommit=True) as owner:
        for role in (alice, bob):
            owner.execute(f"CREATE ROLE {role} LOGIN")
    proxy = proxy_factory("session", upstream=dsn)
    with psycopg.connect(proxy.dsn(database=db, user=alice), autocommit=True) as conn:
        assert conn.execute("SELECT * FROM pgml.load_dataset('iris')").fetchall() == [("pgml.iris", 150)]
        assert conn.execute("SELECT count(*) FROM pgml.iris").fetchone() == (150,)
        trained = conn.execute("SELECT * FROM pgml.train('mine', 'classification', 'pgml.iris', 'target')")
        assert trained.fetchall() == [("mine", "classification", "linear", True)]
    with psycopg.connect(dsn, autocommit=True) as owner:
        owned = owner.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'iris'").fetchone()
        assert owned == (alice,)
    with psycopg.connect(proxy.dsn(database=db, user=bob), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be owner of table iris"):
            conn.execute("SELECT * FROM pgml.load_dataset('iris')")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(proxy.dsn(database=db, user=alice), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgml.iris").fetchone() == (150,)  # nothing lost
        # Its owner reloads it in place.
        assert conn.execute("SELECT * FROM pgml.load_dataset('iris')").fetchall() == [("pgml.iris", 150)]
