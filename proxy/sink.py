"""`ClientSink`: the `ResultSink` the planner writes a client's results to.

Owns encoding RowDescription/DataRow/CommandComplete/NoticeResponse for values the
planner has already encoded in the client's requested formats, and relaying a COPY TO
STDOUT's messages from the upstream; nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from core.datarows import RowBlock, encode_data_row
from core.interfaces import Column, WireValue
from proxy import messages as m


class ClientSink:
    """Writes protocol messages straight to one client's transport, in call order."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self.rows_sent = 0

    async def row_description(self, columns: Sequence[Column]) -> None:
        self._write(m.RowDescription(tuple(columns)).encode())

    async def data_rows(self, rows: Sequence[Sequence[WireValue]]) -> None:
        if isinstance(rows, RowBlock):  # rows as the server sent them, or as the planner built them
            if rows.wire:
                self.rows_sent += len(rows)
                self._write(rows.wire)
        elif rows:
            self.rows_sent += len(rows)
            self._write(b"".join(encode_data_row(r) for r in rows))

    async def command_complete(self, tag: str) -> None:
        self._write(m.CommandComplete(tag).encode())

    async def notice(self, fields: Mapping[str, str]) -> None:
        full = {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": ""}
        full.update(fields)
        self._write(m.error_message(full, notice=True))

    async def copy_message(self, message: bytes) -> None:
        self._write(message)

    async def notice_text(self, message: str) -> None:
        """CallContext.notice: progress lines (training and the like) as INFO notices."""
        await self.notice({"S": "INFO", "V": "INFO", "M": message})

    async def warning_text(self, message: str) -> None:
        """CallContext.warn: an option accepted but not applied, and why (WARNING, 01000)."""
        await self.notice({"S": "WARNING", "V": "WARNING", "C": "01000", "M": message})
