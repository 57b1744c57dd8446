"""uvicorn serving the app on the running event loop; `HttpHandle` stops it.

uvicorn's `Server.serve()` runs as a task of the proxy's loop. Its signal capture is turned
off: SIGINT/SIGTERM/SIGHUP belong to `proxy.main`, which drains and then closes this server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import uvicorn

from core.settings import HttpSettings
from proxy.http.app import build
from proxy.http.common import HttpState

log = logging.getLogger("pgml_proxy")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the proxy handles signals itself


class HttpHandle:
    """The running listener: `address` once started, `draining` (API answers 503), `close()`."""

    def __init__(self, server: _Server, task: asyncio.Task[None], state: HttpState) -> None:
        self._server = server
        self._task = task
        self.state = state
        sockets = [s for srv in server.servers for s in srv.sockets]
        host, port = sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"

    def drain(self) -> None:
        self.state.draining = True

    async def close(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 10)


async def start(settings: HttpSettings, proxy_server: Any) -> HttpHandle:
    """Serve the app on `settings.listen` until `close()`; raises OSError when it cannot bind."""
    state = HttpState(proxy_server, settings)
    config = uvicorn.Config(build(state), host=settings.host, port=settings.port, lifespan="off",
                            log_config=None, access_log=False, timeout_graceful_shutdown=5)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(), name="http")
    while not server.started:
        if task.done():  # it could not bind: its exception (uvicorn exits the process on some)
            task.result()
            raise OSError(f"the HTTP listener did not start on {settings.listen}")
        await asyncio.sleep(0.01)
    handle = HttpHandle(server, task, state)
    log.info("HTTP listener (OpenAI API, /metrics) on http://%s", handle.address)
    return handle
