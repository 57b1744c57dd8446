"""A bare TCP relay on uvloop (one upstream connection per client, bytes passed as they come):
the floor of a Python relay's CPU per request, for benchmarks/passthrough_cpu.py.

Run: ``python -m benchmarks.bare_relay LISTEN_PORT UPSTREAM_PORT`` (127.0.0.1 both).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Up(asyncio.Protocol):
    def __init__(self, down: _Down) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.down.transport is not None
        self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()


class _Down(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.up: _Up | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        _, self.up = await asyncio.get_running_loop().create_connection(
            lambda: _Up(self), "127.0.0.1", self.upstream_port)
        assert self.up.transport is not None
        for data in self.early:
            self.up.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.up is None or self.up.transport is None:
            self.early.append(data)
        else:
            self.up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def _serve(listen_port: int, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Down(upstream_port), "127.0.0.1", listen_port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
