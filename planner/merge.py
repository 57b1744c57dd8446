"""Stream-and-merge: the rows of a SELECT whose select list holds row-dependent pgml calls.

Owns the layout of the rewritten SELECT's upstream columns (pass-through columns, whose
bytes go to the client untouched in the format it asked for, and the ``__pgml_<id>_<k>``
argument columns, numeric arrays among them fetched in binary and read as one NumPy matrix
per chunk), one runtime batch per upstream chunk, and the overlap of fetching chunk n+1
while the model runs on chunk n. Memory holds at most two chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core import datarows
from core.datarows import RowBlock
from core.interfaces import Column, QueryResult
from planner.catalog import ANY, TYPE_OIDS
from planner.plan import RowColumn, StreamCallPlan
from planner.values import BINARY_ARRAYS, TYPE_SIZES, Encoder, decode_column, encoder, type_oid

if TYPE_CHECKING:
    from planner.execute import Event, _Run


_SCALARS = frozenset({"real", "float8", "int", "bigint", "smallint", "boolean"})


@dataclass
class _Slot:
    upstream: int | None  # pass-through column index
    call: StreamCallPlan | None = None
    arg_cols: list[int] | None = None


class Merger:
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.calls = {c.call.id: c for c in run.plan.stream or []}

    async def _upstream_formats(self) -> list[int]:
        """Per upstream column formats: the client's for pass-through columns; binary for the
        argument columns that are numeric arrays (the decoder reads those straight into NumPy),
        text for the other arguments. A Describe first says which is which."""
        rf = list(self.run.bound.result_formats)
        if len(rf) <= 1 and not self._may_read_arrays():
            return rf  # one format for every column, and no argument to read in binary
        desc = await self.run.up.describe(self.run.plan.sql, self.run.oids)
        from planner.execute import arg_column

        out, i = [], 0
        for c in desc.columns or []:
            found = arg_column(c.name)
            if found is None:
                out.append(rf[0] if len(rf) == 1 else rf[i] if i < len(rf) else 0)
            else:
                out.append(1 if c.type_oid in BINARY_ARRAYS else 0)
            i += 1 if found is None or found[1] == 0 else 0
        return out

    def _may_read_arrays(self) -> bool:
        """Whether an argument column may be a numeric array: one declared as such, or `any`
        (predict's features), whose type only the Describe tells."""
        for c in self.calls.values():
            declared = {a.name: a.type for a in c.call.sig.args}
            for name, src in c.call.sources.items():
                kind = declared[name]
                if isinstance(src, RowColumn) and (kind == ANY or TYPE_OIDS.get(kind) in BINARY_ARRAYS):
                    return True
        return False

    def _scalar(self) -> bool:
        """Whether every call gives one number per row: a chunk's results are then small
        whatever its row count, so its chunks may grow (HeldUpstream.stream)."""
        return all(c.out_type in _SCALARS for c in self.calls.values())

    def _layout(self, columns: Sequence[Column]) -> list[_Slot]:
        from planner.execute import arg_column

        slots: list[_Slot] = []
        by_call: dict[int, _Slot] = {}
        for idx, col in enumerate(columns):
            found = arg_column(col.name)
            if found is None or found[0] not in self.calls:
                slots.append(_Slot(idx))
                continue
            slot = by_call.get(found[0])
            if slot is None:
                slot = by_call[found[0]] = _Slot(None, self.calls[found[0]], [])
                slots.append(slot)
            assert slot.arg_cols is not None
            slot.arg_cols.append(idx)
        return slots

    async def events(self) -> AsyncIterator[Event]:
        run = self.run
        vec = await run.ex.vector(run.up) if any(c.out_type == "vector" for c in self.calls.values()) else 0
        formats = await self._upstream_formats()
        slots: list[_Slot] | None = None
        cols: list[Column] = []
        encs: dict[int, Encoder] = {}
        pending: asyncio.Future[RowBlock] | None = None
        tag = ""
        count = 0
        try:
            chunks = run.up.stream(
                run.plan.sql,
                run.params,
                param_oids=run.oids,
                param_formats=run.formats,
                result_formats=formats,
                chunk_rows=run.ex.chunk_rows,
                grow_to_bytes=run.ex.chunk_bytes if self._scalar() else 0,
            )
            # Closed on the way out, whatever ends the loop (a stopped batch raises here while the
            # stream waits at a chunk boundary): its finally syncs the upstream portal before the
            # client is answered, so no reply of this statement is left for the next one.
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if slots is None and chunk.columns is not None:
                        slots = self._layout(chunk.columns)
                        cols = list(chunk.columns)
                        out_cols = []
                        for i, slot in enumerate(slots):
                            if slot.call is None:
                                assert slot.upstream is not None
                                out_cols.append(chunk.columns[slot.upstream])
                                continue
                            fmt = run.bound.result_fmt(i)
                            oid = type_oid(slot.call.out_type, vec)
                            encs[slot.call.call.id] = encoder(slot.call.out_type, fmt, vec)
                            out_cols.append(
                                Column(slot.call.name, oid, type_size=TYPE_SIZES.get(oid, -1), format=fmt)
                            )
                        yield "columns", out_cols
                    count += len(chunk.rows)
                    if chunk.rows and slots is not None:
                        # The new chunk's merge starts before the previous one is awaited, and
                        # is `pending` at once, so the finally cancels it when that await raises.
                        prev, pending = pending, asyncio.ensure_future(self._merge(chunk, slots, cols, encs))
                        if prev is not None:
                            yield "rows", await prev
                    if chunk.command_tag:
                        tag = chunk.command_tag
                if pending is not None:
                    rows, pending = await pending, None
                    yield "rows", rows
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        # After Execute with a row limit, Postgres counts only the last batch: count them all.
        yield "tag", f"SELECT {count}" if tag.startswith("SELECT") else tag

    async def _merge(
        self, chunk: QueryResult, slots: list[_Slot], cols: list[Column], encs: dict[int, Encoder]
    ) -> RowBlock:
        rows = chunk.rows
        if not isinstance(rows, RowBlock):  # (an UpstreamSession whose chunks are lists)
            rows = RowBlock(b"".join(datarows.encode_data_row(r) for r in rows))
        return await self._merge_block(rows, slots, cols, encs)

    async def _merge_block(
        self, block: RowBlock, slots: list[_Slot], cols: list[Column], encs: dict[int, Encoder]
    ) -> RowBlock:
        """A chunk as the server sent it, merged column-wise: pass-through fields are copied as
        bytes, numeric-array arguments read as one matrix, results encoded once per distinct
        value, and the client's rows built in a few array operations (core/datarows.py)."""
        fields = datarows.columns(block, len(cols))
        n = len(block)
        segments: list[tuple[datarows.U8, datarows.I64, datarows.I64]] = []
        for slot in slots:
            if slot.call is None:
                assert slot.upstream is not None
                f = fields[slot.upstream]
                segments.append((f.raw, *f.spans()))
                continue
            assert slot.arg_cols is not None
            args: list[Any] = []
            for j in slot.arg_cols:
                element = BINARY_ARRAYS.get(cols[j].type_oid) if cols[j].format == 1 else None
                matrix = None if element is None else datarows.numeric_matrix(fields[j], element)
                args.append(
                    matrix
                    if matrix is not None
                    else decode_column(cols[j].type_oid, cols[j].format, fields[j].values())
                )
            results = await self.run.batch_columns(slot.call.call, args, n)
            segments.append(_encoded(results, encs[slot.call.call.id]))
        return datarows.assemble(segments, n)


def _encoded(results: Sequence[Any], enc: Encoder) -> tuple[datarows.U8, datarows.I64, datarows.I64]:
    """A call's results as fields for `datarows.assemble`. Floats with few distinct values (a
    classifier's labels) are encoded once per value, told apart by their bits (so -0.0 is not
    0.0); anything else (a NULL among them) once per row."""
    if len(results) >= 64 and set(map(type, results)) == {float}:
        bits = np.asarray(results, dtype=np.float64).view(np.int64)
        distinct, which = np.unique(bits, return_inverse=True)
        if len(distinct) * 4 <= len(results):
            codes = [enc(float(v)) for v in distinct.view(np.float64).tolist()]
            return datarows.repeated_fields(codes, which.astype(np.int64))
    return datarows.encoded_fields([enc(v) for v in results])
