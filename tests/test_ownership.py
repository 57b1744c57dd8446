"""Project ownership through the real proxy, with two login roles of the test Postgres.

A project belongs to the role that created it: others may predict with it, but training
into it or deploying it is 42501 naming the project and its owner, until the owner grants
it (pgml_proxy.grant_project / revoke_project) or the caller is a member of the owner role.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.fix_postgres import PgServer
from tests.fix_proxy import ProxyProcess
from tests.test_tabular_support import new_database

pytestmark = pytest.mark.slow
SETOSA = "ARRAY[5.1, 3.5, 1.4, 0.2]"
TRAIN = "SELECT * FROM pgml.train('{p}', 'classification', 'pgml.iris', 'target')"
RETRAIN = "SELECT * FROM pgml.train('{p}', algorithm => 'xgboost', hyperparams => '{{\"n_estimators\": 2}}')"


class Roles:
    def __init__(self, px: ProxyProcess, db: str, server: PgServer, suffix: str) -> None:
        self.px, self.db, self.server = px, db, server
        self.alice, self.bob, self.carol = (f"{n}_{suffix}" for n in ("alice", "bob", "carol"))

    def sql(self, user: str, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.px.dsn(database=self.db, user=user), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def refused(self, user: str, query: str) -> psycopg.Error:
        with pytest.raises(psycopg.Error) as info:
            self.sql(user, query)
        assert info.value.sqlstate == "42501", str(info.value)
        return info.value


@pytest.fixture(scope="module")
def roles(pg_server: PgServer, proxy_factory: Callable[..., ProxyProcess]) -> Iterator[Roles]:
    dsn = new_database(pg_server, "ownership")
    db = dsn.rsplit("/", 1)[1]
    px = proxy_factory("session", upstream=dsn)
    r = Roles(px, db, pg_server, uuid.uuid4().hex[:8])
    with psycopg.connect(px.dsn(database=db), autocommit=True) as conn:
        conn.execute("SELECT * FROM pgml.load_dataset('iris')")
    with psycopg.connect(dsn, autocommit=True) as direct:
        for role in (r.alice, r.bob, r.carol):
            direct.execute(f"CREATE ROLE {role} LOGIN")
            direct.execute(f"GRANT SELECT ON pgml.iris TO {role}")
        direct.execute(f"GRANT {r.alice} TO {r.carol}")  # carol is a member of alice
    yield r
    px.stop()
    with psycopg.connect(dsn, autocommit=True) as direct:
        for role in (r.alice, r.bob, r.carol):
            direct.execute(f"DROP OWNED BY {role}")
    for role in (r.alice, r.bob, r.carol):
        pg_server.psql(f"DROP ROLE IF EXISTS {role}")


def test_owner_is_recorded_and_others_may_predict(roles: Roles) -> None:
    roles.sql(roles.alice, TRAIN.format(p="owned"))
    [(owner,)] = roles.sql("postgres", "SELECT owner::text FROM pgml.projects WHERE name = 'owned'")
    assert owner == roles.alice
    assert roles.sql(roles.bob, f"SELECT pgml.predict('owned', {SETOSA})") == [(0.0,)]


def test_others_may_not_train_or_deploy(roles: Roles) -> None:
    roles.sql(roles.alice, TRAIN.format(p="guarded"))
    before = roles.sql("postgres", "SELECT count(*) FROM pgml.models")
    err = roles.refused(roles.bob, RETRAIN.format(p="guarded"))
    assert 'project "guarded"' in str(err.diag.message_primary) and f"owned by {roles.alice}" in str(err)
    err = roles.refused(roles.bob, "SELECT * FROM pgml.deploy('guarded', 'most_recent')")
    assert "deploy" in str(err) and roles.alice in str(err)
    [(model_id,)] = roles.sql("postgres", "SELECT max(id) FROM pgml.models")
    roles.refused(roles.bob, f"SELECT * FROM pgml.deploy({model_id})")
    assert roles.sql("postgres", "SELECT count(*) FROM pgml.models") == before  # nothing written
    # The owner, a member of the owner role and a superuser may.
    roles.sql(roles.alice, RETRAIN.format(p="guarded"))
    roles.sql(roles.carol, "SELECT * FROM pgml.deploy('guarded', 'most_recent')")
    roles.sql("postgres", "SELECT * FROM pgml.deploy('guarded', 'best_score')")


def test_grant_and_revoke(roles: Roles) -> None:
    roles.sql(roles.alice, TRAIN.format(p="shared"))
    roles.refused(roles.bob, RETRAIN.format(p="shared"))
    # Only the owner (or a member, or a superuser) may grant.
    err = roles.refused(roles.bob, f"SELECT pgml_proxy.grant_project('shared', '{roles.bob}')")
    assert 'must be owner of project "shared"' in str(err.diag.message_primary)
    assert roles.alice in (err.diag.message_detail or "")
    roles.sql(roles.alice, f"SELECT pgml_proxy.grant_project('shared', '{roles.bob}')")
    roles.sql(roles.bob, RETRAIN.format(p="shared"))
    roles.sql(roles.bob, "SELECT * FROM pgml.deploy('shared', 'best_score')")
    roles.sql(roles.alice, f"SELECT pgml_proxy.revoke_project('shared', '{roles.bob}')")
    roles.refused(roles.bob, RETRAIN.format(p="shared"))


def test_grant_errors(roles: Roles) -> None:
    with pytest.raises(psycopg.errors.UndefinedObject, match='project "nope" does not exist'):
        roles.sql(roles.alice, f"SELECT pgml_proxy.grant_project('nope', '{roles.bob}')")
    roles.sql(roles.alice, TRAIN.format(p="granted twice"))
    with pytest.raises(psycopg.errors.UndefinedObject, match='role "no_such_role_x" does not exist'):
        roles.sql(roles.alice, "SELECT pgml_proxy.grant_project('granted twice', 'no_such_role_x')")
    for _ in range(2):  # granting twice is not an error
        roles.sql(roles.alice, f"SELECT pgml_proxy.grant_project('granted twice', '{roles.bob}')")


def test_legacy_projects_stay_open(roles: Roles) -> None:
    """A project without an owner (made before migration 0004) is writable by every role."""
    roles.sql(roles.alice, TRAIN.format(p="legacy"))
    roles.sql("postgres", "UPDATE pgml.projects SET owner = NULL WHERE name = 'legacy'")
    roles.sql(roles.bob, RETRAIN.format(p="legacy"))
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="has no owner"):
        roles.sql(roles.alice, f"SELECT pgml_proxy.grant_project('legacy', '{roles.bob}')")
