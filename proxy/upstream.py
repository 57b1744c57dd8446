"""`HeldUpstream`: the `UpstreamSession` the planner runs its SQL on, over the client's server conn.

Owns the proxy's own request/response exchanges on a held server connection: simple
queries, one-shot extended statements, streaming with Execute row limits and
PortalSuspended, Describe, and COPY FROM STDIN; upstream errors raise PgError after the
connection has been synced, so it stays usable.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

from core.datarows import RowBlock
from core.errors import PgError
from core.interfaces import Column, QueryResult, StatementDescription, WireValue
from proxy import messages as m
from proxy.backend import ROW_BLOCK, ServerConn


class HeldUpstream:
    """The `UpstreamSession` over the client's server connection (acquired on first use).

    `get_conn` hands out the connection in internal mode with nothing owed, so each
    method writes its own messages and reads exactly its own responses.
    """

    def __init__(self, get_conn: Callable[[], Awaitable[ServerConn]], status: Callable[[], str]) -> None:
        self._get = get_conn
        self._status = status

    @property
    def transaction_status(self) -> str:
        return self._status()

    async def simple(self, sql: str) -> list[QueryResult]:
        conn = await self._get()
        return await conn.run_simple(sql)

    def _extended(self, conn: ServerConn, sql: str, params: Sequence[WireValue], param_oids: Sequence[int],
                  param_formats: Sequence[int], result_formats: Sequence[int]) -> None:
        conn.send(m.Parse("", sql, tuple(param_oids)).encode()
                  + m.Bind("", "", tuple(param_formats), tuple(params), tuple(result_formats)).encode()
                  + m.Describe("P", "").encode())

    async def execute(
        self, sql: str, params: Sequence[WireValue] = (), *, param_oids: Sequence[int] = (),
        param_formats: Sequence[int] = (), result_formats: Sequence[int] = (),
    ) -> QueryResult:
        conn = await self._get()
        self._extended(conn, sql, params, param_oids, param_formats, result_formats)
        conn.send(m.Execute("", 0).encode() + m.SYNC)
        results = await conn.read_results()
        return results[-1] if results else QueryResult(None, [], "")

    async def stream(
        self, sql: str, params: Sequence[WireValue] = (), *, param_oids: Sequence[int] = (),
        param_formats: Sequence[int] = (), result_formats: Sequence[int] = (), chunk_rows: int = 1000,
        grow_to_bytes: int = 0,
    ) -> AsyncGenerator[QueryResult, None]:
        conn = await self._get()
        self._extended(conn, sql, params, param_oids, param_formats, result_formats)
        limit = max(chunk_rows, 1)
        execute = m.Execute("", limit).encode() + m.FLUSH
        # The rows stay as the server sent them, one RowBlock per chunk (core/datarows.py).
        conn.row_blocks = True
        conn.send(execute)
        columns: list[Column] | None = None
        wire: list[bytes] = []
        done = False
        try:
            while True:
                t, body = await conn.recv()
                if t == ROW_BLOCK:
                    wire.append(body)
                elif t == 0x44:  # (not grouped: the flag came after it arrived)
                    wire.append(m.frame(b"D", body))
                elif t == 0x54:
                    columns = list(m.RowDescription.parse(body).columns)
                elif t == 0x73:  # PortalSuspended: hand this chunk over, ask for the next
                    block = RowBlock(b"".join(wire))
                    wire = []
                    if len(block.wire) * 2 <= grow_to_bytes:  # small rows: twice as many next time
                        limit *= 2
                        execute = m.Execute("", limit).encode() + m.FLUSH
                    # The next chunk is asked for before this one is handed over, so the upstream
                    # makes it while the consumer works (one chunk ahead at most).
                    conn.send(execute)
                    yield QueryResult(columns, block, "")
                elif t in (0x43, 0x49):
                    tag = m.CommandComplete.parse(body).tag if t == 0x43 else ""
                    done = True
                    conn.send(m.SYNC)
                    await _read_until_ready(conn)
                    yield QueryResult(columns, RowBlock(b"".join(wire)), tag)
                    return
                elif t == 0x45:
                    done = True
                    err = PgError.from_fields(m.ErrorResponse.parse(body).fields)
                    raise await conn.sync_after_error(err)
        finally:
            try:
                if not done and not conn.closed:  # the consumer stopped early: close the portal cleanly
                    conn.send(m.SYNC)
                    await _read_until_ready(conn)
            finally:
                conn.row_blocks = False

    async def copy_out(
        self, sql: str, params: Sequence[WireValue] = (), *, param_oids: Sequence[int] = (),
        param_formats: Sequence[int] = (),
    ) -> AsyncIterator[bytes | str]:
        conn = await self._get()
        self._extended(conn, sql, params, param_oids, param_formats, ())
        conn.send(m.Execute("", 0).encode() + m.SYNC)
        tag = ""
        async for t, body in _until_ready(conn):
            if t in (0x48, 0x64, 0x63):  # CopyOutResponse, CopyData, CopyDone: relayed as they come
                yield m.frame(bytes((t,)), bytes(body))
            elif t == 0x43:
                tag = m.CommandComplete.parse(body).tag
        yield tag

    async def describe(self, sql: str, param_oids: Sequence[int] = ()) -> StatementDescription:
        conn = await self._get()
        conn.send(m.Parse("", sql, tuple(param_oids)).encode() + m.Describe("S", "").encode() + m.SYNC)
        oids: list[int] = []
        cols: list[Column] | None = None
        async for t, body in _until_ready(conn):
            if t == 0x74:
                oids = list(m.ParameterDescription.parse(body).oids)
            elif t == 0x54:
                cols = list(m.RowDescription.parse(body).columns)
        return StatementDescription(oids, cols)

    async def copy_in(self, sql: str, data: bytes | AsyncIterator[bytes]) -> str:
        conn = await self._get()
        conn.send_query(sql)
        tag = ""
        wrong_direction = False
        async for t, body in _until_ready(conn):
            if t == 0x47:
                await _feed_copy(conn, data)
            elif t == 0x43:
                tag = m.CommandComplete.parse(body).tag
            elif t == 0x48:
                wrong_direction = True
        if wrong_direction:
            raise PgError("copy_in needs COPY ... FROM STDIN, got a COPY TO")
        return tag


async def _until_ready(conn: ServerConn) -> AsyncIterator[tuple[int, bytes]]:
    """Every message up to ReadyForQuery, which sets the transaction status.

    An ErrorResponse is not yielded: it is raised once the server is ready again, so the
    connection is in sync whatever the caller does with the error.
    """
    error: PgError | None = None
    while True:
        t, body = await conn.recv()
        if t == 0x45:
            error = error or PgError.from_fields(m.ErrorResponse.parse(body).fields)
        elif t == 0x5A:
            conn.tx_status = chr(body[0])
            if error is not None:
                raise error
            return
        else:
            yield t, body


async def _feed_copy(conn: ServerConn, data: bytes | AsyncIterator[bytes]) -> None:
    try:
        if isinstance(data, bytes | bytearray):
            for i in range(0, len(data), 65536):
                conn.send(m.copy_data(bytes(data[i : i + 65536])))
        else:
            async for chunk in data:
                conn.send(m.copy_data(chunk))
    except Exception as exc:
        conn.send(m.frame(b"f", m.cstr(f"copy source failed: {exc}")))
        return
    conn.send(m.COPY_DONE)


async def _read_until_ready(conn: ServerConn) -> None:
    while True:
        t, body = await conn.recv()
        if t == 0x5A:
            conn.tx_status = chr(body[0])
            return
