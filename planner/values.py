"""Wire values <-> Python values, through psycopg's adapters (text and binary, by type OID).

Owns the one exception psycopg has no adapter for: pgvector's `vector`, whose text form
is ``[1,2,3]`` and binary form is int16 dim, int16 unused, then float4s (pgvector's
``vector_send``); its OID varies per database and is looked up upstream.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import Format
from psycopg.types.composite import TupleDumper
from psycopg.types.json import Jsonb

from core.errors import CharacterNotInRepertoire, FeatureNotSupported, InvalidParameterValue
from core.interfaces import WireValue
from planner.catalog import TYPE_OIDS

_TX = Transformer()
TYPE_SIZES = {700: 4, 701: 8, 20: 8, 16: 1, 23: 4, 21: 2}
Encoder = Callable[[Any], WireValue]
Decoder = Callable[[WireValue], Any]


_TEXT_OIDS = frozenset({25, 1043, 1042, 19, 0})  # text, varchar, bpchar, name, unknown


def check_bind(
    params: Sequence[WireValue],
    param_formats: Sequence[int],
    result_formats: Sequence[int],
    oids: Sequence[int],
) -> None:
    """What Postgres checks of a Bind before running anything: format codes and text encoding.

    22023 "unsupported format code" for codes other than 0/1 (parameters or results), 22021
    for a text value that is not valid UTF-8 or holds a NUL, worded as Postgres words them.
    """
    for code in (*param_formats, *result_formats):
        if code not in (0, 1):
            raise InvalidParameterValue(f"unsupported format code: {code}")
    for i, value in enumerate(params):
        if value is None:
            continue
        fmt = (
            param_formats[0]
            if len(param_formats) == 1
            else (param_formats[i] if i < len(param_formats) else 0)
        )
        if fmt == 0 or (i < len(oids) and oids[i] in _TEXT_OIDS):
            check_utf8(bytes(value))


def check_utf8(data: bytes) -> None:
    """22021 naming the offending bytes, as Postgres's "invalid byte sequence" does."""
    try:
        data.decode("utf-8")
        bad = data.find(b"\0")
    except UnicodeDecodeError as exc:
        bad = exc.start
    if bad < 0:
        return
    lead = data[bad]
    width = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 1
    shown = " ".join(f"0x{b:02x}" for b in data[bad : bad + width])
    raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "UTF8": {shown}')


def decoder(oid: int, fmt: int) -> Decoder:
    """A function from a field's bytes (format `fmt`) to its Python value.

    A binary one-dimensional numeric array without NULLs becomes a NumPy array in one call
    (the features of `pgml.predict` over a table: no Python float per element); any other
    array falls back to psycopg's loader, which gives lists with None.
    """
    loader = _TX.get_loader(oid, Format(fmt))
    element = BINARY_ARRAYS.get(oid) if fmt == 1 else None

    def load(data: WireValue) -> Any:
        return None if data is None else loader.load(data)

    if element is None:
        return load

    def load_array(data: WireValue) -> Any:
        if data is None or not _one_dim_no_nulls(data):
            return load(data)
        return _elements(np.frombuffer(data, dtype=np.uint8, offset=_HEADER), element)

    return load_array


def decode_column(oid: int, fmt: int, values: Sequence[WireValue]) -> Sequence[Any]:
    """A column of a chunk's rows as Python values. Binary numeric arrays of one shape without
    NULLs (the features of predict over a table) are read as one matrix: a row is a view of it."""
    element = BINARY_ARRAYS.get(oid) if fmt == 1 else None
    present = [v for v in values if v is not None]
    if element is not None and present and len(present) == len(values) and _one_dim_no_nulls(present[0]):
        sizes = {len(v) for v in present}
        if len(sizes) == 1:
            raw = np.frombuffer(b"".join(present), dtype=np.uint8).reshape(len(present), sizes.pop())
            if (raw[:, :_HEADER] == raw[0, :_HEADER]).all():  # one shape: every header alike
                return list(_elements(np.ascontiguousarray(raw[:, _HEADER:]), element))
    load = decoder(oid, fmt)
    return [load(v) for v in values]


def _one_dim_no_nulls(data: bytes) -> bool:
    return len(data) >= _HEADER and data[:8] == _ONE_DIM_NO_NULLS


def _elements(raw: np.ndarray[Any, Any], element: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """An array's (length, value) element pairs after its header, as native-order values."""
    pairs = raw.view(np.dtype([("length", ">i4"), ("value", element)]))
    return pairs["value"].astype(element.newbyteorder("="))


# A binary array's header: ndim, has-nulls flag, element type, then (size, lower bound) per
# dimension; one dimension without NULLs is the form read straight into NumPy.
_HEADER = 20
_ONE_DIM_NO_NULLS = b"\x00\x00\x00\x01\x00\x00\x00\x00"
# Binary numeric arrays read straight into NumPy: element type by array type OID.
BINARY_ARRAYS: dict[int, np.dtype[Any]] = {
    1021: np.dtype(">f4"),  # real[]
    1022: np.dtype(">f8"),  # float8[]
    1005: np.dtype(">i2"),  # smallint[]
    1007: np.dtype(">i4"),  # int[]
    1016: np.dtype(">i8"),  # bigint[]
}


def _plain(value: Any) -> Any:
    """numpy arrays and scalars as Python lists and numbers (psycopg dumps those)."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


@functools.lru_cache(maxsize=256)
def encoder(sql_type: str, fmt: int, vector_oid: int = 0) -> Encoder:
    """A function from a Python result to the field bytes the client asked for (made once per
    type and format: each result of a one-row statement asks for it)."""
    if sql_type == "vector":
        return _vector_text if fmt == 0 else _vector_binary
    if sql_type == "record":
        if fmt != 0:
            raise FeatureNotSupported(
                "binary format for a record-valued pgml column is not supported",
                hint="use SELECT * FROM pgml.f(...) to get typed columns",
            )
        rec = TupleDumper(tuple, _TX)
        return lambda v: None if v is None else bytes(rec.dump(tuple(_plain(x) for x in v)) or b"")
    oid = TYPE_OIDS[sql_type]
    cls = psycopg.adapters.get_dumper_by_oid(oid, Format(fmt))
    dumper = cls(list if sql_type.endswith("[]") else object, _TX)
    as_float = sql_type in ("real", "float8")
    as_int = sql_type in ("bigint", "int", "smallint")
    if as_float and fmt == 0:
        return _float_text

    def dump(value: Any) -> WireValue:
        if value is None:
            return None
        value = _plain(value)
        if as_float:
            value = float(value)
        elif as_int:
            value = int(value)
        elif sql_type == "text" and not isinstance(value, str):
            value = str(value)
        elif sql_type in ("jsonb[]", "json[]"):
            # Each element is one JSON value, even a JSON array (psycopg would read a nested list
            # as a second array dimension).
            value = [None if v is None else Jsonb(v) for v in value]
        return bytes(dumper.dump(value) or b"")

    return dump


def _float_text(value: Any) -> WireValue:
    """A real/float8 result as Postgres writes it: shortest round-trip digits, and its own
    spellings of the special values (psycopg's dumper writes `inf`, which JDBC cannot parse)."""
    if value is None:
        return None
    f = float(value)
    if f != f:
        return b"NaN"
    if f in (math.inf, -math.inf):
        return b"Infinity" if f > 0 else b"-Infinity"
    return repr(f).encode()


def _vector_text(value: Any) -> WireValue:
    if value is None:
        return None
    return ("[" + ",".join(repr(float(x)) for x in _plain(value)) + "]").encode()


def _vector_binary(value: Any) -> WireValue:
    if value is None:
        return None
    items = [float(x) for x in _plain(value)]
    return struct.pack(f">hh{len(items)}f", len(items), 0, *items)


def type_oid(sql_type: str, vector_oid: int) -> int:
    return vector_oid if sql_type == "vector" else TYPE_OIDS[sql_type]


def copy_text_row(values: list[Any], encoders: list[Encoder]) -> bytes:
    """One line of COPY text format (NULL as \\N, backslash escapes for the specials)."""
    out = []
    for value, enc in zip(values, encoders, strict=True):
        data = enc(value)
        if data is None:
            out.append(b"\\N")
        else:
            out.append(
                data.replace(b"\\", b"\\\\")
                .replace(b"\t", b"\\t")
                .replace(b"\n", b"\\n")
                .replace(b"\r", b"\\r")
            )
    return b"\t".join(out) + b"\n"
