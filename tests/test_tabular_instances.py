"""Several TabularRuntime instances on one upstream: concurrent start-up migrations, a model
served after a restart and by a second instance, deploys seen by the others at once,
cancelled training, safe model files, and micro-batching of one-row predicts."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest

from core.errors import DataException, PgError
from runtime.batcher import Batcher, Policy
from runtime.tabular import TabularRuntime, storage
from runtime.tabular.migrations import migration_files
from runtime.tabular.predictor import _stacked
from tests.fix_postgres import PgServer
from tests.test_tabular_support import Notes, call, new_database, tab, tab_dsn, train

__all__ = ["tab", "tab_dsn"]
SETOSA = [5.1, 3.5, 1.4, 0.2]


async def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


async def test_concurrent_start_migrates_once(pg_server: PgServer) -> None:
    dsn = new_database(pg_server, "tabular_mig")
    runtimes = [TabularRuntime(dsn, {"pool_size": 1}) for _ in range(3)]
    try:
        await asyncio.gather(*(rt.start() for rt in runtimes))
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            rows = await (
                await conn.execute("SELECT version, name FROM pgml.migrations ORDER BY 1")
            ).fetchall()
            views = await (
                await conn.execute(
                    "SELECT table_name FROM information_schema.views WHERE table_schema = 'pgml' ORDER BY 1"
                )
            ).fetchall()
        # Each migration exactly once, whichever instance applied it.
        assert rows == [(v, p.name) for v, p in migration_files()]
        assert [v for v, _ in rows] == list(range(1, len(rows) + 1))
        assert [v[0] for v in views] == ["deployed_models", "overview", "trained_models"]
    finally:
        for rt in runtimes:
            await rt.close()


@pytest.mark.slow
async def test_second_instance_and_restart_serve_and_see_deploys(tab: TabularRuntime, tab_dsn: str) -> None:
    project = "instances iris"
    await train(
        tab, project_name=project, task="classification", relation_name="pgml.iris", y_column_name="target"
    )
    await train(tab, project_name=project, algorithm="xgboost", hyperparams={"n_estimators": 10})
    other = TabularRuntime(tab_dsn, {})
    await other.start()
    try:
        first = await call(tab, "predict", [{"project_name": project, "features": SETOSA}])
        assert await call(other, "predict", [{"project_name": project, "features": SETOSA}]) == first == [0.0]
        async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
            ids = [
                r[0]
                for r in await (
                    await conn.execute(
                        "SELECT m.id FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id"
                        " WHERE p.name = %s"
                        " ORDER BY m.id",
                        (project,),
                    )
                ).fetchall()
            ]
        # Deploy the first model through `tab`: `other` (which cached the deployment) follows at once.
        await call(tab, "deploy", [{"model_id": ids[0]}])
        served = other._predictor  # the cache under test

        async def other_follows() -> bool:
            return (
                served._deployed.get(project) in (None, ids[0]) and (await served.model_id(project)) == ids[0]
            )

        assert await wait_for(other_follows)
        await call(other, "deploy", [{"model_id": ids[1]}])
        assert await wait_for(lambda: _is(tab, project, ids[1]))
    finally:
        await other.close()
    # A restart: a brand-new instance serves the model from pgml.files.
    restarted = TabularRuntime(tab_dsn, {})
    await restarted.start()
    try:
        assert await call(
            restarted, "predict_proba", [{"project_name": project, "features": SETOSA}]
        ) == await call(tab, "predict_proba", [{"project_name": project, "features": SETOSA}])
    finally:
        await restarted.close()


async def _is(rt: TabularRuntime, project: str, model_id: int) -> bool:
    return await rt._predictor.model_id(project) == model_id


@pytest.mark.slow
async def test_cancelled_training_writes_nothing(tab: TabularRuntime, tab_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
        before = await (await conn.execute("SELECT count(*) FROM pgml.models")).fetchone()
    notes = Notes()
    task = asyncio.ensure_future(
        train(
            tab,
            notes,
            project_name="cancelled",
            task="classification",
            relation_name="pgml.digits",
            y_column_name="target",
            algorithm="gradient_boosting_trees",
            hyperparams={"n_estimators": 300},
        )
    )
    assert await wait_for(lambda: _noticed(notes), timeout=20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
        after = await (await conn.execute("SELECT count(*) FROM pgml.models")).fetchone()
        project = await (
            await conn.execute("SELECT count(*) FROM pgml.projects WHERE name = 'cancelled'")
        ).fetchone()
    assert after == before and project == (0,)


async def _noticed(notes: Notes) -> bool:
    return any("training" in line for line in notes.lines)


@pytest.mark.slow
async def test_model_files_are_not_pickles_and_foreign_types_are_refused(
    tab: TabularRuntime, tab_dsn: str
) -> None:
    await train(
        tab,
        project_name="files iris",
        task="classification",
        relation_name="pgml.iris",
        y_column_name="target",
        algorithm="random_forest",
        hyperparams={"n_estimators": 5},
    )
    await train(tab, project_name="files iris", algorithm="xgboost", hyperparams={"n_estimators": 5})
    async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
        files = await (
            await conn.execute(
                "SELECT f.path, f.data FROM pgml.files f JOIN pgml.models m ON m.id = f.model_id"
                " JOIN pgml.projects p ON p.id = m.project_id WHERE p.name = 'files iris' ORDER BY f.id"
            )
        ).fetchall()
    # Each native file, with the ONNX form checked equal to it beside it (runtime/tabular/compiled.py).
    assert [f[0] for f in files] == ["model.skops", "model.onnx", "model.ubj", "model.onnx"]
    assert bytes(files[0][1])[:2] == b"PK"  # a skops zip, not a pickle stream (b"\x80")
    # A skops file holding a type outside scikit-learn/NumPy/SciPy is refused before loading.
    from collections import Counter

    import skops.io as sio

    with pytest.raises(DataException) as info:
        storage.load(1, "classification", "sklearn", "linear", sio.dumps({"c": Counter("ab")}), 4, 3)
    assert "collections.Counter" in info.value.message
    # ... and so is a function, even one skops could name (a GP kernel set to `eval`, say).
    with pytest.raises(DataException) as info:
        storage.load(1, "classification", "sklearn", "linear", sio.dumps({"kernel": eval}), 4, 3)
    assert "builtins.eval" in info.value.message


def _rows_policy(**kw: float) -> Policy:
    # The predictor's policy: rows as the cost, no timer, one batch at a time.
    return Policy(**{"max_batch_size": 10000, "wait_s": 0.0, "in_flight": 1, **kw})  # type: ignore[arg-type]


async def test_batcher_groups_concurrent_rows_and_keeps_order() -> None:
    calls: list[int] = []

    def double(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.005)
        return x[:, 0] * 2

    batcher = Batcher("double", _stacked(double), None, _rows_policy(max_batch_tokens=64))
    outs = await asyncio.gather(*(batcher.submit_one(np.array([[float(i)]]), 1) for i in range(100)))
    assert [float(o[0]) for o in outs] == [2.0 * i for i in range(100)]
    assert sum(calls) == 100 and len(calls) < 10 and max(calls) <= 64
    await batcher.close()


async def test_batcher_full_queue_is_53000() -> None:
    batcher = Batcher("same", _stacked(lambda x: x), None, _rows_policy(queue_size=1))
    first = asyncio.ensure_future(batcher.submit_one(np.zeros((1, 1)), 1))
    second = asyncio.ensure_future(batcher.submit_one(np.zeros((1, 1)), 1))
    done = await asyncio.gather(first, second, return_exceptions=True)
    # The second caller runs before the owner task has taken the first row off the queue.
    assert isinstance(done[0], np.ndarray) and isinstance(done[1], PgError)
    assert done[1].sqlstate == "53000" and "full" in done[1].message
    await batcher.close()


@pytest.mark.slow
async def test_one_row_predicts_from_many_callers_are_micro_batched(
    tab: TabularRuntime, tab_dsn: str
) -> None:
    await train(
        tab,
        project_name="microbatch",
        task="classification",
        relation_name="pgml.iris",
        y_column_name="target",
        algorithm="xgboost",
        hyperparams={"n_estimators": 10},
    )
    await call(tab, "predict", [{"project_name": "microbatch", "features": SETOSA}])  # load it
    await asyncio.sleep(0.2)  # let the NOTIFY of our own deploy arrive before measuring
    async with await psycopg.AsyncConnection.connect(tab_dsn) as conn:
        row = await (
            await conn.execute("SELECT id FROM pgml.deployed_models WHERE name = 'microbatch'")
        ).fetchone()
    key = f"{row[0]}/predict"  # type: ignore[index]
    before = tab.batch_stats()[key]
    # 64 callers, one row each, as 64 client connections would send them.
    outs = await asyncio.gather(
        *(call(tab, "predict", [{"project_name": "microbatch", "features": SETOSA}]) for _ in range(64))
    )
    after = tab.batch_stats()[key]
    assert outs == [[0.0]] * 64
    assert after["rows"] - before["rows"] == 64
    batches = after["batches"] - before["batches"]
    assert batches <= 8, f"64 rows took {batches} library calls"  # many rows per call


async def test_batcher_runs_batches_inline_when_its_owner_says_so() -> None:
    """`inline(payloads)`: a batch it accepts runs on the event loop's thread, others in the pool."""
    threads: list[int] = []

    def run(blocks: list[np.ndarray]) -> list[np.ndarray]:
        threads.append(threading.get_ident())
        return blocks

    pool = ThreadPoolExecutor(1)
    policy = _rows_policy(max_batch_tokens=100)
    batcher = Batcher("inline", run, pool, policy, lambda xs: sum(map(len, xs)) <= 4)
    small = await batcher.submit_one(np.zeros((2, 1)), 2)
    big = await batcher.submit_one(np.zeros((50, 1)), 50)
    assert threads == [threading.get_ident(), threads[1]] and threads[1] != threading.get_ident()
    assert len(small) == 2 and len(big) == 50
    await batcher.close()
    pool.shutdown()


async def test_inline_estimate_recovers_from_a_slow_first_run_and_backs_off_a_slow_model() -> None:
    """The inline estimate (CPU time on the loop, a fixed part and a part per row): a cold
    first run far over the budget does not keep a fast model off the loop for good (a measured
    probe brings it back), while a model that is slow every time is probed ever more rarely;
    a batch of many rows is priced at the fixed part plus its rows, not at rows times one run."""
    slow = [0.02]  # seconds of CPU a run burns; the first run is cold

    def run(blocks: list[np.ndarray]) -> list[np.ndarray]:
        end = time.thread_time() + slow[0]
        while time.thread_time() < end:
            pass
        return blocks

    pool = ThreadPoolExecutor(1)
    policy = _rows_policy(max_batch_tokens=100, inline_budget_s=0.005)
    batcher = Batcher("estimate", run, pool, policy, lambda xs: True)
    assert batcher.can_run_now(np.zeros((1, 1)), 1)  # nothing measured yet
    batcher.run_now(np.zeros((1, 1)), 1)  # cold: 20 ms, four times the budget
    slow[0] = 0.0002
    refused = 0
    while not batcher.can_run_now(np.zeros((1, 1)), 1):
        refused += 1
        assert refused < 200
    batcher.run_now(np.zeros((1, 1)), 1)  # the probe: measured, and the estimate comes down
    assert batcher.can_run_now(np.zeros((1, 1)), 1) and batcher.can_run_now(np.zeros((8, 1)), 8)
    batcher.run_now(np.zeros((8, 1)), 8)  # a larger run, measured: its extra rows cost nothing
    assert batcher.can_run_now(np.zeros((16, 1)), 16)
    # A model slow at every run: probes, each measured over budget, come ever more rarely.
    slow[0] = 0.02
    batcher.run_now(np.zeros((1, 1)), 1)
    gaps, count = [], 0
    for _ in range(2000):
        count += 1
        if batcher.can_run_now(np.zeros((1, 1)), 1):
            batcher.run_now(np.zeros((1, 1)), 1)
            gaps.append(count)
            count = 0
    assert len(gaps) >= 3 and gaps[-1] > gaps[0] * 2, gaps
    await batcher.close()
    pool.shutdown()
