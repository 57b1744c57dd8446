"""Wire values <-> Python values, through psycopg's adapters (text and binary, by type OID).

Owns the one exception psycopg has no adapter for: pgvector's `vector`, whose text form
is ``[1,2,3]`` and binary form is int16 dim, int16 unused, then float4s (pgvector's
``vector_send``); its OID varies per database and is looked up upstream.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import Format
from psycopg.types.composite import TupleDumper

from core.errors import FeatureNotSupported
from core.interfaces import WireValue
from planner.catalog import TYPE_OIDS

_TX = Transformer()
TYPE_SIZES = {700: 4, 701: 8, 20: 8, 16: 1, 23: 4, 21: 2}
Encoder = Callable[[Any], WireValue]
Decoder = Callable[[WireValue], Any]


def decoder(oid: int, fmt: int) -> Decoder:
    """A function from a field's bytes (format `fmt`) to its Python value."""
    loader = _TX.get_loader(oid, Format(fmt))

    def load(data: WireValue) -> Any:
        return None if data is None else loader.load(data)

    return load


def _plain(value: Any) -> Any:
    """numpy arrays and scalars as Python lists and numbers (psycopg dumps those)."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def encoder(sql_type: str, fmt: int, vector_oid: int = 0) -> Encoder:
    """A function from a Python result to the field bytes the client asked for."""
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
        return bytes(dumper.dump(value) or b"")

    return dump


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
