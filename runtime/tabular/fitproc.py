"""`FitWorkers`: each `pgml.train` fit in a worker process that a stopped statement kills.

Scikit-learn's fits have no hook to stop them (a forest's trees, an SVM's solver, a grid
search's candidates), so in a thread a cancelled fit burned its cores to the end. Every
fit, boosting included, runs in a `runtime.tabular.fit_worker` process instead: when the
statement is stopped (cancel, statement_timeout, disconnect) its task is cancelled and the
process and its group are killed at once (runtime.processes), before anything is
registered. One path for all fits also means a fit that exhausts memory kills its worker,
not the proxy and every client's session with it: the client gets 53200.

A process starts cold in 1-3 s here (Python, NumPy, scikit-learn), so finished workers
are kept warm for the next fit, up to `runtime.tabular.idle_fit_processes`, unless their
memory grew past `_KEEP_RSS` (a big fit's heap is not given back to the system). Data goes
to the worker as `.npy` files in a job folder and the model comes back as the bytes that
are stored, in their safe formats: no pickles either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import OutOfMemory, PgError, SystemError_
from runtime import processes

from . import training

log = logging.getLogger(__name__)
_KEEP_RSS = 1 << 30  # bytes: a worker grown past this is not kept for the next fit
_MODULE = "runtime.tabular.fit_worker"


@dataclass
class Fitted:
    """What a fit gives back to be registered: the stored files and what is known of them."""

    metrics: dict[str, Any]
    hyperparams: dict[str, Any]
    files: list[tuple[str, bytes]]  # (path in pgml.files, bytes): the native model, maybe its ONNX form
    serving: str  # what serves the model and why, for the log and a notice
    importances: list[float] | None


class FitWorkers:
    """The tabular runtime's fit processes: started on demand, kept warm, killed on a stop."""

    def __init__(self, idle: int) -> None:
        self._idle_max = idle
        self._idle: list[asyncio.subprocess.Process] = []
        self._closed = False

    async def fit(
        self,
        job: training.TrainJob,
        onnx: bool,
        n_classes: int,
        progress: Callable[[str], Awaitable[None]],
    ) -> Fitted:
        """Run `job` in a worker; its progress lines go to `progress`. Cancelling this kills it."""
        folder = Path(tempfile.mkdtemp(prefix="pgml-fit-"))
        proc: asyncio.subprocess.Process | None = None
        ended = False
        # Shielded: a stop while the arrays are written must not remove the folder under the thread.
        writing = asyncio.ensure_future(asyncio.to_thread(_write_job, folder, job, onnx, n_classes))
        try:
            await asyncio.shield(writing)
            proc = await self._take()
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # dead: _outcome says how
                proc.stdin.write(f"{folder}\n".encode())
                await proc.stdin.drain()
            outcome = await _outcome(proc, progress)
            ended = True
            if "error" in outcome:
                raise PgError.from_fields(outcome["error"])
            return await asyncio.to_thread(_read_result, folder, outcome["result"])
        finally:
            if proc is not None:
                if ended and self._keep(proc):
                    self._idle.append(proc)
                else:  # stopped mid-fit (or dead): the fit ends now, not when the library is done
                    await processes.kill(proc)
            if writing.done():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                writing.add_done_callback(lambda _: _remove(folder, writing))

    async def _take(self) -> asyncio.subprocess.Process:
        while self._idle:
            proc = self._idle.pop()
            if proc.returncode is None:
                return proc
        return await processes.start(_MODULE, stdin=True)

    def _keep(self, proc: asyncio.subprocess.Process) -> bool:
        if self._closed or proc.returncode is not None or len(self._idle) >= self._idle_max:
            return False
        return _rss(proc.pid) < _KEEP_RSS

    async def close(self) -> None:
        """Kill the idle workers; fits in flight are killed by their statements' ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for proc in idle:
            await processes.kill(proc)


async def _outcome(
    proc: asyncio.subprocess.Process, progress: Callable[[str], Awaitable[None]]
) -> dict[str, Any]:
    """Relay the worker's progress lines; its result or error line, or the error its death is."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        message = json.loads(line)
        if "progress" in message:
            await progress(str(message["progress"]))
        else:
            return dict(message)
    code = await proc.wait()
    if code == -signal.SIGKILL:
        log.warning("fit process %s was killed (SIGKILL), most likely for lack of memory", proc.pid)
        raise OutOfMemory(
            "pgml.train: the training process was killed (SIGKILL), most likely by the "
            "out-of-memory killer",
            hint="train on fewer rows, or with hyperparameters that make a smaller model",
        )
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    log.warning("fit process %s ended with %s", proc.pid, how)
    raise SystemError_(
        f"pgml.train: the training process ended with {how}", hint="the proxy's log has its output"
    )


def _remove(folder: Path, writing: asyncio.Future[None]) -> None:
    """The folder of a fit stopped while its arrays were written, once the writing thread is done."""
    if not writing.cancelled():
        writing.exception()  # retrieved: a failed write of a stopped fit is nobody's error
    shutil.rmtree(folder, ignore_errors=True)


def _write_job(folder: Path, job: training.TrainJob, onnx: bool, n_classes: int) -> None:
    spec = {
        "task": job.task,
        "algorithm": job.algorithm,
        "hyperparams": job.hyperparams,
        "search": job.search,
        "search_params": job.search_params,
        "search_args": job.search_args,
        "onnx": onnx,
        "n_classes": n_classes,
    }
    (folder / "job.json").write_text(json.dumps(spec))
    for name in ("x_train", "y_train", "x_test", "y_test"):
        array = getattr(job, name)
        if array is not None:
            np.save(folder / f"{name}.npy", array, allow_pickle=False)


def _read_result(folder: Path, result: dict[str, Any]) -> Fitted:
    files = [(str(path), (folder / f"file-{i}").read_bytes()) for i, path in enumerate(result["files"])]
    return Fitted(
        dict(result["metrics"]),
        dict(result["hyperparams"]),
        files,
        str(result["serving"]),
        None if result["importances"] is None else [float(v) for v in result["importances"]],
    )


def _rss(pid: int) -> int:
    """Resident bytes of `pid` (Linux); unknown counts as too big to keep."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _KEEP_RSS
