"""The v3 wire-protocol codec, sans-IO: bytes in, typed messages out, and back.

Owns framing (`Framer` yields ``(type, body)`` without decoding bodies), the frozen
message dataclasses the proxy must build or read (`encode()` gives the framed bytes,
`parse(body)` the reverse), and a few helpers for the messages that are only ever read
in part (ErrorResponse fields, ParameterStatus). No sockets, no asyncio: the asyncio
layer (frontend/backend) moves bytes and drives this. Peer misbehaviour raises
`ProtocolViolation` (08P01).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from core.datarows import encode_data_row, parse_row_values
from core.errors import ProtocolViolation
from core.interfaces import Column, WireValue

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_I16 = struct.Struct("!h")


def frame(kind: bytes, body: bytes = b"") -> bytes:
    """One framed message: type byte, int32 length (self-inclusive), body."""
    return kind + _I32.pack(len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


class Reader:
    """Reads fields of one message body; raises ProtocolViolation when it runs short."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = bytes(buf)
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolViolation("insufficient data left in message")

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def byte(self) -> bytes:
        self._need(1)
        self.pos += 1
        return self.buf[self.pos - 1 : self.pos]

    def cstr(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolViolation("invalid string in message")
        text = self.buf[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return text

    def raw(self, n: int) -> bytes:
        self._need(n)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def value(self) -> WireValue:
        n = self.int32()
        return None if n == -1 else self.raw(n)


class Framer:
    """Splits a byte stream into messages. `feed` then iterate; leftovers wait for more bytes.

    `max_size` bounds a single message (a larger length prefix is a protocol violation),
    so a hostile peer cannot make the proxy buffer without limit.
    """

    __slots__ = ("buf", "max_size")

    def __init__(self, max_size: int = 1 << 30) -> None:
        self.buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self.buf += data

    def scan(self) -> tuple[list[tuple[int, int, int]], int]:
        """The complete messages in `buf` as (type, start, end), and how many bytes they span.

        The hot path: the caller relays slices of `buf`, then calls `drop(used)`.
        """
        return scan(self.buf, self.max_size)

    def drop(self, used: int) -> None:
        if used:
            del self.buf[:used]

    def messages(self) -> Iterator[tuple[int, int, int]]:
        """Yield (type byte, start, end) of each complete message, then drop them.

        start/end delimit the whole framed message in `buf` (the body is
        ``buf[start + 5:end]``); they are valid only inside the loop, so callers slice
        out what they keep. Nothing is decoded here: relaying needs only the type.
        """
        buf = self.buf
        pos = 0
        n = len(buf)
        try:
            while n - pos >= 5:
                length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if length < 4 or length > self.max_size:
                    raise ProtocolViolation(
                        f"message of type {chr(buf[pos])!r} declares length {length}; "
                        f"the limit is {self.max_size} bytes"
                    )
                end = pos + 1 + length
                if end > n:
                    break
                start, pos = pos, end
                yield buf[start], start, end
        finally:
            if pos:
                del buf[:pos]


HEAD = struct.Struct("!BI").unpack_from  # a message's type and length, read in place


def scan(buf: bytes | bytearray, max_size: int) -> tuple[list[tuple[int, int, int]], int]:
    """The complete messages at the start of `buf` as (type, start, end), and the bytes they span."""
    n = len(buf)
    pos = 0
    out: list[tuple[int, int, int]] = []
    append = out.append
    while n - pos >= 5:
        t, length = HEAD(buf, pos)
        if length < 4 or length > max_size:
            raise ProtocolViolation(
                f"message of type {chr(t)!r} declares length {length}; "
                f"the limit is {max_size} bytes"
            )
        end = pos + 1 + length
        if end > n:
            break
        append((t, pos, end))
        pos = end
    return out, pos


# --- startup-phase messages (no type byte) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    params: Mapping[str, str]
    version: int = PROTOCOL_3_0

    def encode(self) -> bytes:
        body = _I32.pack(self.version) + b"".join(cstr(k) + cstr(v) for k, v in self.params.items()) + b"\0"
        return _I32.pack(len(body) + 4) + body

    @classmethod
    def parse(cls, body: bytes) -> StartupMessage:
        r = Reader(body)
        version = r.int32()
        params: dict[str, str] = {}
        while r.pos < len(r.buf) and r.buf[r.pos] != 0:
            key = r.cstr()
            params[key] = r.cstr()
        return cls(params, version)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return struct.pack("!iiii", 16, CANCEL_REQUEST, self.pid, self.secret)

    @classmethod
    def parse(cls, body: bytes) -> CancelRequest:
        r = Reader(body)
        r.int32()
        pid = r.int32()
        secret = int.from_bytes(r.raw(4), "big", signed=True)
        return cls(pid, secret)


# --- frontend (client -> server) messages --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    sql: str

    def encode(self) -> bytes:
        return frame(b"Q", cstr(self.sql))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> Query:
        return cls(Reader(body).cstr())


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    param_oids: tuple[int, ...] = ()

    def encode(self) -> bytes:
        oids = b"".join(_I32.pack(o if o < 1 << 31 else o - (1 << 32)) for o in self.param_oids)
        return frame(b"P", cstr(self.name) + cstr(self.sql) + _I16.pack(len(self.param_oids)) + oids)

    @classmethod
    def parse(cls, body: bytes | memoryview) -> Parse:
        r = Reader(body)
        name, sql = r.cstr(), r.cstr()
        oids = tuple(r.int32() & 0xFFFFFFFF for _ in range(r.int16()))
        return cls(name, sql, oids)


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[WireValue, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        parts = [cstr(self.portal), cstr(self.statement), _I16.pack(len(self.param_formats))]
        parts += [_I16.pack(f) for f in self.param_formats]
        parts.append(_I16.pack(len(self.params)))
        for v in self.params:
            parts.append(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v)
        parts.append(_I16.pack(len(self.result_formats)))
        parts += [_I16.pack(f) for f in self.result_formats]
        return frame(b"B", b"".join(parts))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> Bind:
        # What Reader would read, in one tight pass: a one-row predict's every Execute has one.
        buf = bytes(body)
        end1 = buf.find(b"\0")
        end2 = buf.find(b"\0", end1 + 1) if end1 >= 0 else -1
        if end2 < 0:
            raise ProtocolViolation("invalid string in message")
        portal = buf[:end1].decode("utf-8", "replace")
        stmt = buf[end1 + 1 : end2].decode("utf-8", "replace")
        pos, size = end2 + 1, len(buf)
        try:
            (n,) = _I16.unpack_from(buf, pos)
            pfmt = struct.unpack_from(f"!{n}h", buf, pos + 2) if n > 0 else ()
            pos += 2 + 2 * max(n, 0)
            (n,) = _I16.unpack_from(buf, pos)
            pos += 2
            params: list[WireValue] = []
            for _ in range(n):
                (length,) = _I32.unpack_from(buf, pos)
                pos += 4
                if length == -1:
                    params.append(None)
                    continue
                if length < 0 or pos + length > size:
                    raise ProtocolViolation("insufficient data left in message")
                params.append(buf[pos : pos + length])
                pos += length
            (n,) = _I16.unpack_from(buf, pos)
            rfmt = struct.unpack_from(f"!{n}h", buf, pos + 2) if n > 0 else ()
        except struct.error:
            raise ProtocolViolation("insufficient data left in message") from None
        return cls(portal, stmt, pfmt, tuple(params), rfmt)


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str

    def encode(self) -> bytes:
        return frame(b"D", self.kind.encode() + cstr(self.name))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> Describe:
        r = Reader(body)
        kind = r.byte().decode("latin-1")
        if kind not in ("S", "P"):
            raise ProtocolViolation(f"Describe of kind {kind!r}; expected 'S' or 'P'")
        return cls(kind, r.cstr())


@dataclass(frozen=True, slots=True)
class Close:
    kind: str
    name: str

    def encode(self) -> bytes:
        return frame(b"C", self.kind.encode() + cstr(self.name))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> Close:
        d = Describe.parse(body)
        return cls(d.kind, d.name)


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(b"E", cstr(self.portal) + _I32.pack(self.max_rows))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> Execute:
        r = Reader(body)
        return cls(r.cstr(), r.int32())


SYNC = frame(b"S")
FLUSH = frame(b"H")
TERMINATE = frame(b"X")
COPY_DONE = frame(b"c")


def copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


# --- backend (server -> client) messages ---------------------------------------------------

PARSE_COMPLETE = frame(b"1")
BIND_COMPLETE = frame(b"2")
CLOSE_COMPLETE = frame(b"3")
CLOSE_UNNAMED = frame(b"C", b"S\0")  # Close of the unnamed statement
NO_DATA = frame(b"n")
PORTAL_SUSPENDED = frame(b"s")
EMPTY_QUERY = frame(b"I")
AUTH_OK = frame(b"R", _I32.pack(0))


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # 'I', 'T' or 'E'

    def encode(self) -> bytes:
        return frame(b"Z", self.status.encode())

    @classmethod
    def parse(cls, body: bytes | memoryview) -> ReadyForQuery:
        return cls(bytes(body[:1]).decode("latin-1"))


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(b"S", cstr(self.name) + cstr(self.value))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> ParameterStatus:
        r = Reader(body)
        return cls(r.cstr(), r.cstr())


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return frame(b"K", _I32.pack(self.pid) + _I32.pack(self.secret))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> BackendKeyData:
        r = Reader(body)
        pid = r.int32()
        # Protocol 3.2 allows longer keys; we ask for 3.0, so it is 4 bytes.
        return cls(pid, int.from_bytes(r.raw(4), "big", signed=True))


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str

    def encode(self) -> bytes:
        return frame(b"C", cstr(self.tag))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> CommandComplete:
        return cls(Reader(body).cstr())


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """ErrorResponse ('E') or, with `notice=True`, NoticeResponse ('N')."""

    fields: Mapping[str, str] = field(default_factory=dict)
    notice: bool = False

    def encode(self) -> bytes:
        body = b"".join(k.encode() + cstr(v) for k, v in self.fields.items() if len(k) == 1) + b"\0"
        return frame(b"N" if self.notice else b"E", body)

    @classmethod
    def parse(cls, body: bytes | memoryview, notice: bool = False) -> ErrorResponse:
        r = Reader(body)
        fields: dict[str, str] = {}
        while r.pos < len(r.buf) and r.buf[r.pos] != 0:
            code = r.byte().decode("latin-1")
            fields[code] = r.cstr()
        return cls(fields, notice)


@dataclass(frozen=True, slots=True)
class RowDescription:
    columns: tuple[Column, ...]

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.columns))]
        for c in self.columns:
            parts.append(
                cstr(c.name)
                + struct.pack("!IhIhih", c.table_oid, c.column_attr, c.type_oid, c.type_size,
                              c.type_modifier, c.format)
            )
        return frame(b"T", b"".join(parts))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> RowDescription:
        r = Reader(body)
        cols = []
        for _ in range(r.int16()):
            name = r.cstr()
            table, attr, oid, size, mod, fmt = struct.unpack("!IhIhih", r.raw(18))
            cols.append(Column(name, oid, table, attr, size, mod, fmt))
        return cls(tuple(cols))


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    oids: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(b"t", _I16.pack(len(self.oids)) + b"".join(struct.pack("!I", o) for o in self.oids))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> ParameterDescription:
        r = Reader(body)
        return cls(tuple(r.int32() & 0xFFFFFFFF for _ in range(r.int16())))


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[WireValue, ...]

    def encode(self) -> bytes:
        return encode_data_row(self.values)

    @classmethod
    def parse(cls, body: bytes | memoryview) -> DataRow:
        return cls(parse_row_values(bytes(body)))


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        body = _I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized))
        return frame(b"v", body + b"".join(cstr(o) for o in self.unrecognized))

    @classmethod
    def parse(cls, body: bytes | memoryview) -> NegotiateProtocolVersion:
        r = Reader(body)
        minor = r.int32()
        return cls(minor, tuple(r.cstr() for _ in range(r.int32())))


def error_message(fields: Mapping[str, str], notice: bool = False) -> bytes:
    """A framed ErrorResponse (or NoticeResponse) with `fields` (S, V, C, M always expected)."""
    return ErrorResponse(dict(fields), notice).encode()


def parse_options(options: str) -> dict[str, str]:
    """The settings of a startup `options` string: ``-c name=value`` and ``--name=value``.

    Backslash escapes a space inside a value, as libpq's PGOPTIONS does.
    """
    words: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: dict[str, str] = {}
    it = iter(words)
    for word in it:
        if word == "-c":
            word = next(it, "")
        elif word.startswith("--"):
            word = word[2:]
        elif word.startswith("-c"):
            word = word[2:]
        else:
            raise ProtocolViolation(f"invalid command-line argument for server process: {word}")
        name, sep, value = word.partition("=")
        if not sep:
            raise ProtocolViolation(f"-c {word} requires a value")
        out[name.replace("-", "_")] = value
    return out
