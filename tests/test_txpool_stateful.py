"""Transaction pooling under random interleavings, against Postgres itself (hypothesis stateful).

Several clients (libpq through psycopg's `pq` layer, so that every protocol message is the
test's choice) share fewer server connections than there are clients, through the real
proxy in transaction mode; each client has a twin connected straight to Postgres that gets
the same operations. Every result is compared with its twin's: rows, command tags, and the
SQLSTATE of every error. Operations: protocol Parse/Bind/Execute/Describe/Close of named
statements and of the unnamed one, pipelines (with an error inside, so that the rest is skipped to Sync),
transactions that commit or roll back (SET LOCAL, set_config(..., true), PREPARE inside),
SQL-level PREPARE/EXECUTE/DEALLOCATE (simple Query, and inside pipelines), DEALLOCATE ALL,
DISCARD ALL, SET/RESET/RESET ALL and set_config, SHOW, and clients that reconnect. The same
machine runs through session pooling too (one server connection per client).

CI runs a fixed seed and a bounded number of examples; TXPOOL_EXAMPLES=2000 (and
TXPOOL_STEPS) runs longer (see README.md). Not compared, by design: pg_prepared_statements
(README.md says what a client sees there), error message texts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from psycopg import pq

from tests.fix_proxy import ProxyProcess

CLIENTS = 4
POOL_SIZE = 2
EXAMPLES = int(os.environ.get("TXPOOL_EXAMPLES", "8"))
STEPS = int(os.environ.get("TXPOOL_STEPS", "25"))

# q1 is also a SQL-level name below: the namespaces are one. "": the unnamed statement.
NAMES = ["s1", "s2", "q1", ""]
TEXTS = ["select $1::int + 1", "select $1::text || 'x'", "select 10 / $1::int"]
SIMPLE = [
    "DEALLOCATE ALL", "DEALLOCATE s1", "DEALLOCATE q1", "DEALLOCATE PREPARE q2", "DISCARD ALL",
    "PREPARE q1(int) AS select $1 * 2", "PREPARE q2 AS select 'q2'", "EXECUTE q1(21)", "EXECUTE q2",
    "PREPARE s1(int) AS select $1 - 1", "EXECUTE s1(5)",
    "SET work_mem = '5MB'", "SET work_mem TO DEFAULT", "RESET work_mem", "RESET ALL",
    "SET enable_seqscan = off", "select set_config('work_mem', '7MB', false)",
    "select set_config('enable_seqscan', 'off', true)", "SET LOCAL work_mem = '9MB'",
    "SHOW work_mem", "SHOW enable_seqscan", "select 1/0", "select 'plain'",
    "select 1; PREPARE q2 AS select 'multi'; select 2",
]
IN_TX = [*SIMPLE[5:], "select 1/0"]
# Statements a pipeline sends through the extended protocol (as psycopg's pipeline mode does).
IN_PIPELINE = ["PREPARE q1(int) AS select $1 * 2", "EXECUTE q1(21)", "DEALLOCATE q1", "DEALLOCATE ALL",
               "SET work_mem = '6MB'", "SHOW work_mem", "EXECUTE s1(5)"]

Outcome = tuple[Any, ...]


def outcome(res: pq.abc.PGresult) -> Outcome:
    status = pq.ExecStatus(res.status)
    if status == pq.ExecStatus.FATAL_ERROR:
        return ("error", res.error_field(pq.DiagnosticField.SQLSTATE))
    if status == pq.ExecStatus.TUPLES_OK:
        return ("rows", [tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)])
    return (status.name, res.command_status, res.nparams if status == pq.ExecStatus.COMMAND_OK else None)


def simple(pg: pq.abc.PGconn, sql: str) -> list[Outcome]:
    """A simple Query: every statement's result, as libpq gives them."""
    pg.send_query(sql.encode())
    out = []
    while (res := pg.get_result()) is not None:
        out.append(outcome(res))
    return out


def pipeline(pg: pq.abc.PGconn, items: list[tuple[str, str, int]]) -> list[Outcome]:
    """Send everything, one Sync, then read: after an error the rest comes back aborted."""
    pg.enter_pipeline_mode()
    for op, name, arg in items:
        if op == "parse":
            pg.send_prepare(name.encode(), TEXTS[arg % len(TEXTS)].encode())
        elif op == "sql":
            pg.send_query_params(IN_PIPELINE[arg].encode(), None)
        elif op == "exec":
            pg.send_query_prepared(name.encode(), [str(arg).encode()])
        elif op == "close":
            pg.send_close_prepared(name.encode())
        else:
            pg.send_query_params(b"select 10 / $1::int", [str(arg).encode()])
    pg.pipeline_sync()
    out: list[Outcome] = []
    while True:
        res = pg.get_result()
        if res is None:
            continue
        if res.status == pq.ExecStatus.PIPELINE_SYNC:
            break
        out.append(outcome(res))
    pg.exit_pipeline_mode()
    return out


def connect(dsn: str) -> pq.abc.PGconn:
    pg = pq.PGconn.connect(dsn.encode())
    assert pg.status == pq.ConnStatus.OK, pg.get_error_message()
    return pg


class Pooling(RuleBasedStateMachine):
    direct_dsn = ""
    proxy_dsn = ""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.pairs = [(connect(self.direct_dsn), connect(self.proxy_dsn)) for _ in range(CLIENTS)]

    def both(self, i: int, op: Callable[[pq.abc.PGconn], list[Outcome]], what: str) -> None:
        direct, proxied = self.pairs[i]
        want, got = op(direct), op(proxied)
        self.log.append(f"client {i}: {what}: {want}")
        # The proxy outlives examples, so a failure may not replay: the steps come with it.
        if got != want and os.environ.get("TXPOOL_TRACE"):
            with open(os.environ["TXPOOL_TRACE"], "a") as fh:
                fh.write(f"--- proxy {got}\n" + "\n".join(self.log) + "\n")
        assert got == want, f"client {i}: {what}: proxy {got} != direct {want}\n" + "\n".join(self.log)
        assert proxied.transaction_status == direct.transaction_status, what

    clients = st.integers(0, CLIENTS - 1)
    names = st.sampled_from(NAMES)

    @rule(i=clients, name=names, text=st.integers(0, len(TEXTS) - 1))
    def parse(self, i: int, name: str, text: int) -> None:
        self.both(i, lambda pg: [outcome(pg.prepare(name.encode(), TEXTS[text].encode()))],
                  f"Parse {name} {TEXTS[text]!r}")

    @rule(i=clients, name=names, arg=st.integers(0, 3))
    def execute(self, i: int, name: str, arg: int) -> None:
        self.both(i, lambda pg: [outcome(pg.exec_prepared(name.encode(), [str(arg).encode()]))],
                  f"Bind/Execute {name}({arg})")

    @rule(i=clients, name=names)
    def describe(self, i: int, name: str) -> None:
        self.both(i, lambda pg: [outcome(pg.describe_prepared(name.encode()))], f"Describe {name}")

    @rule(i=clients, name=names)
    def close(self, i: int, name: str) -> None:
        self.both(i, lambda pg: [outcome(pg.close_prepared(name.encode()))], f"Close {name}")

    @rule(i=clients, sql=st.sampled_from(SIMPLE))
    def query(self, i: int, sql: str) -> None:
        self.both(i, lambda pg: simple(pg, sql), sql)

    ops = st.sampled_from(["parse", "exec", "close", "fail", "sql"])

    @rule(i=clients, items=st.lists(st.tuples(ops, names, st.integers(0, len(IN_PIPELINE) - 1)),
                                    min_size=1, max_size=5))
    def pipelined(self, i: int, items: list[tuple[str, str, int]]) -> None:
        self.both(i, lambda pg: pipeline(pg, items), f"pipeline {items}")

    @rule(i=clients, body=st.lists(st.sampled_from(IN_TX), min_size=1, max_size=4),
          end=st.sampled_from(["COMMIT", "ROLLBACK"]))
    def transaction(self, i: int, body: list[str], end: str) -> None:
        # Opened and ended within one rule: no client keeps a server connection between
        # rules, so the small pool always has one for the next client.
        for sql in ["BEGIN", *body, end]:
            self.both(i, lambda pg, sql=sql: simple(pg, sql),  # type: ignore[misc]
                      f"in a transaction: {sql}")

    @rule(i=clients)
    def settings_now(self, i: int) -> None:
        self.both(i, lambda pg: simple(pg, "SHOW work_mem") + simple(pg, "SHOW enable_seqscan"), "SHOW")

    @rule(i=clients)
    def reconnect(self, i: int) -> None:
        self.log.append(f"client {i}: reconnect")
        for pg in self.pairs[i]:
            pg.finish()
        self.pairs[i] = (connect(self.direct_dsn), connect(self.proxy_dsn))

    def teardown(self) -> None:
        for pair in self.pairs:
            for pg in pair:
                pg.finish()


@pytest.fixture(scope="module", params=["transaction", "session"])
def small_pool(
    request: pytest.FixtureRequest, proxy_factory: Callable[..., ProxyProcess]
) -> Iterator[ProxyProcess]:
    """Transaction pooling on fewer server connections than clients; session pooling (each
    client its own server connection, as many as the clients) runs the same operations."""
    size = POOL_SIZE if request.param == "transaction" else CLIENTS + 1
    p = proxy_factory(request.param, pool_size=size, pool_timeout=10.0)
    yield p
    p.stop()


def test_pooling_matches_postgres(small_pool: ProxyProcess, pg_dsn: str) -> None:
    Pooling.direct_dsn, Pooling.proxy_dsn = pg_dsn, small_pool.dsn()
    run_state_machine_as_test(Pooling, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True,
        database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))
