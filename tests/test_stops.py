"""Every stop stops the work: cancel, statement_timeout, a vanished client, through the real proxy.

The proxy runs as a subprocess (tests/fix_proxy.py) in front of the test Postgres, with the
model aliases of tests/models.test.toml. The workload is an embed of many rows with the real
all-MiniLM-L6-v2 (tens of seconds uncancelled on this machine), a boosting train with an
absurd number of rounds, and scikit-learn fits that have no hook to stop them (a forest of
absurdly many trees, a grid search over such forests). After each stop the client must get
57014 worded as Postgres words it, the CPU of the proxy and of every process it started (the
fit processes) must fall to idle (read from /proc/<pid>/stat), the connection must stay
usable, and a stopped train must leave the registry as it was. A fit process killed from
outside (as the out-of-memory killer does) gives its client 53200, and a proxy killed
outright takes its fit processes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.errors import InvalidParameterValue
from testing.tiny_models import build_all
from tests.fix_proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
USER_REQUEST = "canceling statement due to user request"
TIMEOUT = "canceling statement due to statement timeout"
# Long enough rows that the uncancelled statement runs well past every bound below.
TEXT = "repeat('the quick brown fox jumps ', 12) || i"
# Materialised: the calls' results go to a temporary table in chunks, then the aggregate upstream.
BIG_EMBED = f"SELECT count(pgml.embed('all-MiniLM-L6-v2', {TEXT})) FROM generate_series(1, 20000) i"
# Streamed: results merged into the rows as they come (one-dimensional, to keep the output small).
STREAMED_EMBED = (
    f"SELECT pgml.embed('all-MiniLM-L6-v2', {TEXT}, '{{\"truncate_dim\": 1}}')"
    " FROM generate_series(1, 20000) i"
)
BIG_TRAIN = (
    "SELECT * FROM pgml.train('stops_project', 'regression', 'stops_data', 'y',"
    " algorithm => 'xgboost', hyperparams => '{\"n_estimators\": 100000000}')"
)
# No hook between a forest's trees: only killing the fit process stops it (minutes uncancelled).
BIG_FOREST = (
    "SELECT * FROM pgml.train('stops_forest', 'regression', 'stops_data', 'y',"
    " algorithm => 'random_forest', hyperparams => '{\"n_estimators\": 20000}')"
)
BIG_SEARCH = (
    "SELECT * FROM pgml.train('stops_search', 'regression', 'stops_data', 'y',"
    " algorithm => 'random_forest', search => 'grid',"
    " search_params => '{\"n_estimators\": [20000, 30000], \"max_depth\": [4, 8]}')"
)
FIT_WORKER = "runtime.tabular.fit_worker"
DATA = (
    "CREATE TABLE IF NOT EXISTS stops_data AS SELECT i::float8 AS x1, (i % 7)::float8 AS x2,"
    " (i * 2 + i % 3)::float8 AS y FROM generate_series(1, 2000) i"
)


def _config(tmp: Path) -> Path:
    build_all(ROOT / ".cache/tiny-models")
    base = (ROOT / "tests/config.test.toml").read_text().replace("[runtime]\n", "", 1)
    path = tmp / "config.toml"
    path.write_text(base + "\n" + (ROOT / "tests/models.test.toml").read_text())
    return path


@pytest.fixture(scope="module", params=["session", "transaction"])
def stop_proxy(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proxy = start_proxy(pg_dsn, str(request.param), config=_config(tmp_path_factory.mktemp("stops")))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # load the model before any timing
        conn.execute("SELECT pgml.embed('all-MiniLM-L6-v2', 'warm up')")
        conn.execute("DROP TABLE IF EXISTS stops_data")
        conn.execute(DATA)
    # On a fresh checkout the first embed starts the model's ONNX export in the background;
    # its CPU after a stop is not the stopped statement's, so the checks start once it is done.
    _wait_onnx(proxy)
    yield proxy
    proxy.stop()


def _wait_onnx(proxy: ProxyProcess, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(proxy.dsn(database="pgml_proxy"), autocommit=True) as admin:
            cur = admin.execute("SHOW MODELS")
            names = [d.name for d in cur.description or []]
            models = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        if any("all-MiniLM-L6-v2" in str(m["name"]) and m["engine"] == "onnx" for m in models):
            return
        time.sleep(1)
    pytest.fail(f"all-MiniLM-L6-v2 was not served on ONNX within {timeout} s: {models}")


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command: [0] state, [1] ppid, [11:15] CPU ticks."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _tree(pid: int) -> list[int]:
    """`pid` and every live process it started, at any depth."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU of the proxy and its descendants: live ones' utime + stime, reaped ones' cutime + cstime."""
    total = 0
    for each in _tree(pid):
        with contextlib.suppress(OSError):
            total += sum(int(v) for v in _stat(each)[11:15])
    return total / TICKS


def _fit_workers(pid: int) -> list[int]:
    """The live fit processes the proxy started."""
    found = []
    for each in _tree(pid)[1:]:
        with contextlib.suppress(OSError):
            if FIT_WORKER in Path(f"/proc/{each}/cmdline").read_text() and _stat(each)[0] != "Z":
                found.append(each)
    return found


def _cpu_falls(pid: int, within: float = 3.0, window: float = 0.5) -> float:
    """Seconds until the process uses under 5% of a core over `window`; fails past `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within + window:
        before = _cpu_seconds(pid)
        time.sleep(window)
        if (_cpu_seconds(pid) - before) / window < 0.05:
            return time.monotonic() - start - window
    pytest.fail(f"the proxy still burns CPU {within} s after the stop")


def _cpu_busy(pid: int, within: float = 10.0) -> bool:
    """Whether the process gets busy (model work started) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = _cpu_seconds(pid)
        time.sleep(0.5)
        if (_cpu_seconds(pid) - before) / 0.5 > 0.1:  # the machine is shared: a modest share
            return True
    return False


class Running:
    """`sql` on `conn` in a thread; `wait` returns the error it ended with and when."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.error: BaseException | None = None
        self.ended = 0.0
        self.thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self.thread.start()

    def _run(self, conn: psycopg.Connection[Any], sql: str) -> None:
        try:
            conn.execute(sql).fetchall()
        except BaseException as exc:
            self.error = exc
        self.ended = time.monotonic()

    def wait(self, timeout: float) -> BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the statement did not end within {timeout} s"
        return self.error


def _registry(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pgml.models), (SELECT count(*) FROM pgml.deployments)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _assert_canceled(error: BaseException | None, message: str) -> None:
    assert isinstance(error, psycopg.errors.QueryCanceled), repr(error)
    assert error.diag.sqlstate == "57014"
    assert error.diag.message_primary == message


def _cancel_or_time_out(proxy: ProxyProcess, sql: str, how: str, timeout: str, after: float) -> None:
    """`sql` stopped by the client's cancel (`how` "cancel") or its statement_timeout `timeout`."""

    def setup(conn: psycopg.Connection[Any]) -> None:
        if how == "timeout":
            conn.execute(f"SET statement_timeout = '{timeout}'")

    stop = (lambda c: c.cancel()) if how == "cancel" else (lambda c: None)
    _stop_and_check(proxy, sql, stop, USER_REQUEST if how == "cancel" else TIMEOUT, setup, after=after)


def _stop_and_check(
    proxy: ProxyProcess, sql: str, stop: Callable[[psycopg.Connection[Any]], None], message: str,
    setup: Callable[[psycopg.Connection[Any]], None] = lambda _c: None, after: float = 1.5,
) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        setup(conn)
        running = Running(conn, sql)
        try:
            time.sleep(after)
            assert running.thread.is_alive(), "the workload ended before the stop: make it bigger"
            assert _cpu_busy(proxy.pid)
            stopped = time.monotonic()
            stop(conn)
            error = running.wait(10)
        except BaseException:
            _vanish(conn)  # a statement that did not stop must not hold the test up for minutes
            raise
        _assert_canceled(error, message)
        assert running.ended - stopped < 2.5, f"answered {running.ended - stopped:.1f} s after the stop"
        _cpu_falls(proxy.pid)
        conn.rollback()
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)  # the connection stays usable


def _vanish(conn: psycopg.Connection[Any]) -> None:
    """The client's socket shut down under its driver: to the proxy, a client that is gone."""
    with contextlib.suppress(OSError):
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("sql", [BIG_EMBED, STREAMED_EMBED], ids=["materialised", "streamed"])
def test_cancel_during_embed(stop_proxy: ProxyProcess, sql: str) -> None:
    _stop_and_check(stop_proxy, sql, lambda c: c.cancel(), USER_REQUEST)


def test_statement_timeout_set_on_embed(stop_proxy: ProxyProcess) -> None:
    def setup(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET statement_timeout = '2s'")

    _stop_and_check(stop_proxy, BIG_EMBED, lambda c: None, TIMEOUT, setup, after=1.0)


def test_statement_timeout_set_local_on_embed(stop_proxy: ProxyProcess) -> None:
    with psycopg.connect(stop_proxy.dsn()) as conn:  # not autocommit: a transaction block
        conn.execute("SET LOCAL statement_timeout = '1500ms'")
        _ends_with_timeout(conn, BIG_EMBED, within=4)
        _cpu_falls(stop_proxy.pid)
        conn.rollback()
        # SET LOCAL ended with its transaction: the same statement is no longer timed out early.
        conn.execute("SELECT count(pgml.embed('all-MiniLM-L6-v2', 'x' || i)) FROM generate_series(1, 3) i")


def _ends_with_timeout(conn: psycopg.Connection[Any], sql: str, within: float) -> None:
    started = time.monotonic()
    running = Running(conn, sql)
    try:
        error = running.wait(within + 5)
    except BaseException:
        _vanish(conn)
        raise
    _assert_canceled(error, TIMEOUT)
    assert running.ended - started < within, f"ended after {running.ended - started:.1f} s"


def test_disconnect_mid_embed(stop_proxy: ProxyProcess) -> None:
    conn = psycopg.connect(stop_proxy.dsn(), autocommit=True)
    running = Running(conn, BIG_EMBED)
    time.sleep(1.5)
    assert running.thread.is_alive() and _cpu_busy(stop_proxy.pid)
    _vanish(conn)
    running.wait(10)
    conn.close()
    _cpu_falls(stop_proxy.pid)
    with psycopg.connect(stop_proxy.dsn(), autocommit=True) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("how", ["cancel", "timeout", "timeout_local"])
def test_train_stopped_writes_nothing(stop_proxy: ProxyProcess, how: str) -> None:
    with psycopg.connect(stop_proxy.dsn(), autocommit=True) as conn:
        before = _registry(conn)
    if how == "timeout_local":
        with psycopg.connect(stop_proxy.dsn()) as conn:
            conn.execute("SET LOCAL statement_timeout = '3s'")
            _ends_with_timeout(conn, BIG_TRAIN, within=6)
            conn.rollback()
    else:
        _cancel_or_time_out(stop_proxy, BIG_TRAIN, how, "3s", after=2.0)
    _cpu_falls(stop_proxy.pid)
    with psycopg.connect(stop_proxy.dsn(), autocommit=True) as conn:
        assert _registry(conn) == before


@pytest.mark.parametrize("sql", [BIG_FOREST, BIG_SEARCH], ids=["forest", "grid_search"])
@pytest.mark.parametrize("how", ["cancel", "timeout", "disconnect"])
def test_fit_without_hooks_stopped(stop_proxy: ProxyProcess, how: str, sql: str) -> None:
    """Stopped mid-fit, its process is killed: the CPU falls at once and nothing is registered."""
    with psycopg.connect(stop_proxy.dsn(), autocommit=True) as conn:
        before = _registry(conn)
    if how == "disconnect":
        conn = psycopg.connect(stop_proxy.dsn(), autocommit=True)
        running = Running(conn, sql)
        _fitting(stop_proxy.pid)
        assert running.thread.is_alive() and _cpu_busy(stop_proxy.pid)
        _vanish(conn)
        running.wait(10)
        conn.close()
    else:
        # Stopped once the fit runs (a cold fit process first imports scikit-learn for 1-3 s).
        _cancel_or_time_out(stop_proxy, sql, how, "6s", after=4.5)
    _cpu_falls(stop_proxy.pid)
    with psycopg.connect(stop_proxy.dsn(), autocommit=True) as other:
        assert _registry(other) == before


def _fitting(pid: int, within: float = 15.0) -> list[int]:
    """The proxy's fit processes once one has started and worked a while (past its imports)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        workers = _fit_workers(pid)
        if workers and sum(_cpu_seconds(w) for w in workers) > 3.0:
            return workers
        time.sleep(0.2)
    pytest.fail(f"no fit process worked {within} s after the train started")


def test_fit_process_killed_is_an_error_not_a_hang(stop_proxy: ProxyProcess) -> None:
    """The out-of-memory killer's way (SIGKILL from outside): 53200, and the next fit works."""
    with psycopg.connect(stop_proxy.dsn(), autocommit=True) as conn:
        before = _registry(conn)
        running = Running(conn, BIG_FOREST)
        try:
            for worker in _fitting(stop_proxy.pid):
                os.kill(worker, signal.SIGKILL)
            error = running.wait(10)
        except BaseException:
            _vanish(conn)
            raise
        assert isinstance(error, psycopg.errors.OutOfMemory), repr(error)
        assert error.diag.sqlstate == "53200" and "killed" in (error.diag.message_primary or "")
        assert _registry(conn) == before
        conn.execute("SELECT * FROM pgml.train('stops_after_kill', 'regression', 'stops_data', 'y')")
        assert _registry(conn)[0] == before[0] + 1


def test_proxy_killed_takes_its_fit_processes(pg_dsn: str) -> None:
    """No orphans: a proxy killed outright (SIGKILL) leaves no fit process burning the machine."""
    proxy = start_proxy(pg_dsn, "session")
    try:
        conn = psycopg.connect(proxy.dsn(), autocommit=True)
        conn.execute(DATA)
        Running(conn, BIG_FOREST)
        workers = _fitting(proxy.pid)
        proxy.stop(signal.SIGKILL)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "a fit process outlived its proxy"
    finally:
        proxy.stop(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"  # a zombie has stopped; init reaps it when it will
    except OSError:
        return False


# --- the stop scope itself -------------------------------------------------------------------------
def test_statement_timeout_values() -> None:
    from core.stop import timeout_ms

    assert [timeout_ms(v) for v in ("0", "500ms", "2s", "1min", "1h", "1d", "250")] == [
        0, 500, 2000, 60_000, 3_600_000, 86_400_000, 250
    ]
    with pytest.raises(InvalidParameterValue):
        timeout_ms("soon")


async def test_stop_scope_timeout_callbacks_and_first_reason() -> None:
    import asyncio

    from core.stop import TIMEOUT, Stop

    stop, fired = Stop(), []
    stop.add(lambda: fired.append("a"))
    stop.set_timeout(50)
    await asyncio.sleep(0.2)
    assert stop.stopped and stop.reason == TIMEOUT and fired == ["a"]
    stop.stop()  # a later cancel: the first reason stays, callbacks do not run again
    assert stop.error().sqlstate == "57014" and str(stop.error().message) == TIMEOUT and fired == ["a"]
    late: list[str] = []
    stop.add(lambda: late.append("b"))  # registered after the stop: runs at once
    assert late == ["b"]
