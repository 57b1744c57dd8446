"""DataRow messages in bulk: a chunk of rows kept as the wire bytes it came in, read and built
column by column with NumPy.

A batch predict over a table moves 100,000 rows through the proxy. Read one Python object per
row and per field, that is most of the statement's time; here a chunk of rows stays one bytes
object, a column is a pair of arrays (where each field starts, how long it is), and the rows
the client gets are assembled from such columns in a few array operations. A `RowBlock` is
also a `Sequence` of rows, so code that wants per-row values still gets them (parsed on
demand, as before). The per-row DataRow codec lives here too: one place for the layout.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from core.errors import ProtocolViolation

WireValue = bytes | None
U8 = np.ndarray[Any, np.dtype[np.uint8]]
I64 = np.ndarray[Any, np.dtype[np.int64]]

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_NULL = b"\xff\xff\xff\xff"
_HEAD = 7  # 'D', int32 length, int16 field count


def parse_row_values(buf: bytes) -> tuple[WireValue, ...]:
    """A DataRow body's values, in one tight loop."""
    unpack = _I32.unpack_from
    end = len(buf)
    try:
        (count,) = _I16.unpack_from(buf, 0)
        pos = 2
        out: list[WireValue] = []
        for _ in range(count):
            (size,) = unpack(buf, pos)
            pos += 4
            if size == -1:
                out.append(None)
                continue
            if size < 0 or pos + size > end:
                raise ProtocolViolation("insufficient data left in message")
            out.append(buf[pos : pos + size])
            pos += size
    except struct.error:
        raise ProtocolViolation("insufficient data left in message") from None
    return tuple(out)


def encode_data_row(values: Sequence[WireValue]) -> bytes:
    """One framed DataRow message."""
    parts = [_I16.pack(len(values))]
    for v in values:
        parts.append(_NULL if v is None else _I32.pack(len(v)) + v)
    body = b"".join(parts)
    return b"D" + _I32.pack(len(body) + 4) + body


class RowBlock(Sequence[tuple[WireValue, ...]]):
    """Whole DataRow messages back to back, as they came from the server (or as built here).

    Indexing gives a row's values, parsed on demand; `wire` is what a client is sent.
    """

    __slots__ = ("_starts", "wire")

    def __init__(self, wire: bytes, starts: I64 | None = None) -> None:
        self.wire = wire
        self._starts = starts

    @property
    def starts(self) -> I64:
        """Where each message starts, and one past the end: n + 1 offsets."""
        if self._starts is None:
            self._starts = message_starts(self.wire)
        return self._starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __bool__(self) -> bool:
        return bool(self.wire)

    @overload
    def __getitem__(self, i: int) -> tuple[WireValue, ...]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[WireValue, ...]]: ...
    def __getitem__(self, i: int | slice) -> tuple[WireValue, ...] | list[tuple[WireValue, ...]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self.starts
        if i < 0:
            i += len(s) - 1
        if not 0 <= i < len(s) - 1:
            raise IndexError(i)
        return parse_row_values(self.wire[int(s[i]) + 5 : int(s[i + 1])])

    def __iter__(self) -> Iterator[tuple[WireValue, ...]]:
        wire, s = self.wire, self.starts.tolist()
        for a, b in itertools.pairwise(s):
            yield parse_row_values(wire[a + 5 : b])

    def rows(self) -> list[tuple[WireValue, ...]]:
        return list(self)


def message_starts(wire: bytes) -> I64:
    """The start of every DataRow in `wire`, and its end: one vectorised check when the rows
    are all one length (numeric columns), else one step per row."""
    n = len(wire)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    if n < 5:
        raise ProtocolViolation("a DataRow block ends inside a message")
    (first,) = _I32.unpack_from(wire, 1)
    size = first + 1
    if first >= 6 and n % size == 0:
        u8 = np.frombuffer(wire, dtype=np.uint8).reshape(n // size, size)
        if (u8[:, 0] == 0x44).all() and (u8[:, 1:5] == u8[0, 1:5]).all():
            return np.arange(0, n + 1, size, dtype=np.int64)
    out: list[int] = []
    pos = 0
    unpack = _I32.unpack_from
    while pos < n:
        if wire[pos] != 0x44 or pos + 5 > n:
            raise ProtocolViolation("a DataRow block holds another message")
        out.append(pos)
        pos += 1 + unpack(wire, pos + 1)[0]
    if pos != n:
        raise ProtocolViolation("a DataRow block ends inside a message")
    out.append(n)
    return np.asarray(out, dtype=np.int64)


def uniform_run(buf: bytes | bytearray) -> int:
    """How many bytes at the start of `buf` are whole DataRows all of one length (the rows of
    numeric columns, a batch predict's): found in one vectorised pass rather than one step per
    message, so a connection reading such rows frames them in bulk. 0 when the first is not."""
    n = len(buf)
    if n < 5 or buf[0] != 0x44:
        return 0
    length = int(_I32.unpack_from(buf, 1)[0])
    size = length + 1
    if length < 6 or size > n:
        return 0
    rows = n // size
    grid = np.frombuffer(buf, dtype=np.uint8, count=rows * size).reshape(rows, size)
    same = (grid[:, 0] == 0x44) & (grid[:, 1:5] == grid[0, 1:5]).all(axis=1)
    return int(rows if same.all() else same.argmin()) * size


def _gather(u8: U8, at: I64, size: int) -> U8:
    """`size` bytes from each offset, as a (rows, size) array: a strided view when the offsets
    are evenly spaced (rows of one length), else one gather."""
    if len(at) > 1:
        step = int(at[1] - at[0])
        if step > 0 and (np.diff(at) == step).all():
            view: U8 = np.lib.stride_tricks.as_strided(
                u8[int(at[0]) :], shape=(len(at), size), strides=(step, 1), writeable=False
            )
            return view
    out: U8 = u8[at[:, None] + np.arange(size)]
    return out


def _int32s(u8: U8, at: I64) -> I64:
    """The big-endian int32 at each offset."""
    b = _gather(u8, at, 4).astype(np.int64)
    out: I64 = (b[:, 0] << 24) | (b[:, 1] << 16) | (b[:, 2] << 8) | b[:, 3]
    return np.where(out >= 1 << 31, out - (1 << 32), out)


class Fields:
    """One column of a block: where each row's field starts (at its int32 length) and its
    length (-1: NULL). `raw` is the whole block as bytes, for the views below."""

    __slots__ = ("at", "lengths", "raw")

    def __init__(self, raw: U8, at: I64, lengths: I64) -> None:
        self.raw, self.at, self.lengths = raw, at, lengths

    def spans(self) -> tuple[I64, I64]:
        """Each field with its length prefix: (start, byte count), to copy into other rows."""
        return self.at, 4 + np.maximum(self.lengths, 0)

    def values(self) -> list[WireValue]:
        """The fields as bytes (None for NULL): one Python object per row, for the general path."""
        raw = self.raw.tobytes()
        at, lengths = self.at.tolist(), self.lengths.tolist()
        return [None if n < 0 else raw[a + 4 : a + 4 + n] for a, n in zip(at, lengths, strict=True)]


def columns(block: RowBlock, count: int) -> list[Fields]:
    """Every column of the block's rows, which must each hold `count` fields (08P01 if not)."""
    starts = block.starts
    raw = np.frombuffer(block.wire, dtype=np.uint8)
    at = starts[:-1] + _HEAD
    if len(at) and not ((raw[starts[:-1] + 5].astype(np.int64) << 8 | raw[starts[:-1] + 6]) == count).all():
        raise ProtocolViolation(f"a DataRow does not hold the {count} fields its RowDescription has")
    out: list[Fields] = []
    ends = starts[1:]
    for _ in range(count):
        if len(at) and (at + 4 > ends).any():
            raise ProtocolViolation("insufficient data left in message")
        lengths = _int32s(raw, at) if len(at) else np.zeros(0, dtype=np.int64)
        if (lengths < -1).any():
            raise ProtocolViolation("a DataRow field has a negative length")
        out.append(Fields(raw, at, lengths))
        at = at + 4 + np.maximum(lengths, 0)
    if len(at) and (at != ends).any():
        raise ProtocolViolation("insufficient data left in message")
    return out


def numeric_matrix(col: Fields, element: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
    """A column of binary one-dimensional numeric arrays of one length, without NULLs (either
    the array or an element), as one (rows, length) matrix in native byte order; None for
    anything else, which the caller reads row by row."""
    n = len(col.at)
    if n == 0 or (col.lengths != col.lengths[0]).any() or col.lengths[0] < 20:
        return None
    size = int(col.lengths[0])
    width = element.itemsize
    dims = (size - 20) // (4 + width)
    if 20 + dims * (4 + width) != size:
        return None
    grid = _gather(col.raw, col.at + 4, size)  # (rows, size) bytes
    head = grid[:, :20]
    if not (head == head[0]).all():
        return None  # another element type, dimension or lower bound in some row
    h = head[0].tobytes()
    ndim, nulls, _elem, length = struct.unpack_from("!iiii", h)
    if ndim != 1 or nulls != 0 or length != dims:
        return None
    pairs = np.ascontiguousarray(grid[:, 20:]).view(np.dtype([("length", ">i4"), ("value", element)]))
    if dims and not (pairs["length"] == width).all():
        return None
    values: np.ndarray[Any, Any] = pairs["value"].reshape(n, dims).astype(element.newbyteorder("="))
    return values


def encoded_fields(values: Sequence[WireValue]) -> tuple[U8, I64, I64]:
    """Fields given as bytes (None: NULL), as a byte pool and each one's (start, span) with its
    length prefix, for `assemble`."""
    parts = [_NULL if v is None else _I32.pack(len(v)) + v for v in values]
    spans = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    starts = np.zeros(len(parts), dtype=np.int64)
    if len(parts) > 1:
        np.cumsum(spans[:-1], out=starts[1:])
    return np.frombuffer(b"".join(parts), dtype=np.uint8), starts, spans


def repeated_fields(codes: Sequence[WireValue], which: I64) -> tuple[U8, I64, I64]:
    """Fields that take one of a few values (`codes`, e.g. a classifier's labels as text):
    row i is `codes[which[i]]`. The few values are encoded once."""
    pool, starts, spans = encoded_fields(codes)
    return pool, starts[which], spans[which]


def assemble(segments: Sequence[tuple[U8, I64, I64]], rows: int) -> RowBlock:
    """DataRows built from whole fields (length prefix included): each segment is a byte pool
    with, per row, the start and span of that row's field in it."""
    count = len(segments)
    total = np.full(rows, _HEAD, dtype=np.int64)
    for _, _, spans in segments:
        total += spans
    ends = np.cumsum(total)
    starts = ends - total
    out = np.empty(int(ends[-1]) if rows else 0, dtype=np.uint8)
    if rows:
        out[starts] = 0x44
        length = total - 1
        for k in range(4):
            out[starts + 1 + k] = (length >> (8 * (3 - k))) & 0xFF
        out[starts + 5] = (count >> 8) & 0xFF
        out[starts + 6] = count & 0xFF
    dest = starts + _HEAD
    for pool, src, spans in segments:
        _copy_spans(out, dest, pool, src, spans)
        dest = dest + spans
    return RowBlock(out.tobytes(), np.append(starts, out.size))


def _copy_spans(out: U8, dest: I64, pool: U8, src: I64, spans: I64) -> None:
    """out[dest[i] : dest[i] + spans[i]] = pool[src[i] : src[i] + spans[i]] for every i."""
    if not len(spans):
        return
    first = int(spans[0])
    if (spans == first).all():  # one width (numbers in binary, a classifier's labels): a 2-D copy
        values = _gather(pool, src, first)
        step = int(dest[1] - dest[0]) if len(dest) > 1 else 0
        if step > 0 and (np.diff(dest) == step).all():
            np.lib.stride_tricks.as_strided(
                out[int(dest[0]) :], shape=(len(dest), first), strides=(step, 1)
            )[...] = values
        else:
            out[dest[:, None] + np.arange(first)] = values
        return
    within = np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans)
    out[np.repeat(dest, spans) + within] = pool[np.repeat(src, spans) + within]
