"""The runtime's worker processes: how they start, how they are killed, how they die with the proxy.

Work that must be stoppable at once (a statement's cancel, timeout or disconnect) and that
a library cannot interrupt runs in a `python -m <module>` process, never a fork of the
proxy (which has ONNX Runtime's and torch's threads: a fork of a threaded process may
deadlock in the child). Each worker leads its own process group, so `kill` takes what it
started too (joblib's loky workers, data loaders), and `as_worker`, called first thing in
the worker, makes the kernel kill it when the proxy dies, however it dies, and pick it
before the proxy when memory runs out.
Used by fine-tuning (runtime.tune.worker) and by tabular fits (runtime.tabular.fit_worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]  # the folder holding the `runtime` package
_LINE_LIMIT = 1 << 24  # bytes of one stdout line: a fit's result holds a whole search's scores
_PARENT = "PGML_WORKER_PARENT"  # the proxy's pid, for the worker's check that it is still there
_OOM_SCORE_ADJ = 500  # of -1000..1000; an unprivileged process may raise its own


async def start(
    module: str,
    *args: str,
    stdin: bool = False,
    stderr: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """`python -m module args...` with a piped stdout (and stdin when asked), in its own group."""
    environ = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        _PARENT: str(os.getpid()),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,  # None: the proxy's own stderr, so a crash's traceback is in its log
        limit=_LINE_LIMIT,
        env=environ,
        cwd=str(ROOT),
        start_new_session=True,
    )


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the worker and its process group, and reap it (even when the caller is cancelled)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(proc.wait())


def as_worker() -> None:
    """Called first in a worker: it dies with the proxy, and is the first to go when memory runs out.

    Linux: PR_SET_PDEATHSIG sends it SIGKILL when the proxy's thread that started it ends (the
    event loop's, which lives as long as the proxy); a proxy that died before this call left
    the worker to init, and it exits here instead. A raised oom_score_adj makes the kernel's
    out-of-memory killer take a worker (its client gets 53200) before the proxy (every client).
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: a stop still kills the worker; a killed proxy leaves it to finish
    parent = os.environ.get(_PARENT)
    if parent is not None and os.getppid() != int(parent):
        os._exit(1)
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(_OOM_SCORE_ADJ))
