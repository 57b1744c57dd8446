"""core/datarows.py: DataRows read and built column-wise equal the row-by-row codec.

Randomised (hypothesis): blocks of rows with NULLs, empty and varied fields, one-length rows
(the vectorised paths) and mixed lengths; binary numeric arrays read as one matrix equal
psycopg's own loader; malformed blocks raise 08P01, never a wrong row.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.pq import Format

from core import datarows
from core.errors import ProtocolViolation

fields = st.one_of(st.none(), st.binary(max_size=12))


@st.composite
def blocks(draw: st.DrawFn) -> list[tuple[bytes | None, ...]]:
    count = draw(st.integers(0, 4))
    uniform = draw(st.booleans())
    if uniform:  # every row one length: the strided paths
        widths = [draw(st.integers(0, 8)) for _ in range(count)]
        row = st.tuples(*(st.binary(min_size=w, max_size=w) for w in widths))
    else:
        row = st.tuples(*([fields] * count))
    return draw(st.lists(row, max_size=40))


def _wire(rows: Sequence[Sequence[bytes | None]]) -> bytes:
    return b"".join(datarows.encode_data_row(r) for r in rows)


@settings(max_examples=300, deadline=None)
@given(blocks())
def test_block_reads_as_the_rows(rows: list[tuple[bytes | None, ...]]) -> None:
    block = datarows.RowBlock(_wire(rows))
    assert len(block) == len(rows)
    assert list(block) == rows
    assert block[:] == rows
    if rows:
        assert block[-1] == rows[-1]
        count = len(rows[0])
        cols = datarows.columns(block, count)
        for k in range(count):
            assert cols[k].values() == [r[k] for r in rows]


@settings(max_examples=300, deadline=None)
@given(blocks(), st.data())
def test_assembled_rows_equal_encoded_rows(rows: list[tuple[bytes | None, ...]], data: st.DataObject) -> None:
    """Rows rebuilt from the block's columns in another order, with a computed column among
    them, are the bytes the row-by-row encoder gives."""
    if not rows:
        return
    count = len(rows[0])
    block = datarows.RowBlock(_wire(rows))
    cols = datarows.columns(block, count)
    order = data.draw(st.permutations(range(count)))
    extra = data.draw(st.lists(fields, min_size=len(rows), max_size=len(rows)))
    few = data.draw(st.lists(st.binary(max_size=3), min_size=1, max_size=3))
    which = data.draw(st.lists(st.integers(0, len(few) - 1), min_size=len(rows), max_size=len(rows)))
    segments = [(cols[k].raw, *cols[k].spans()) for k in order]
    at = data.draw(st.integers(0, len(segments)))
    segments.insert(at, datarows.encoded_fields(extra))
    segments.append(datarows.repeated_fields(few, np.asarray(which, dtype=np.int64)))
    built = datarows.assemble(segments, len(rows))
    want = []
    for i, r in enumerate(rows):
        values = [r[k] for k in order]
        values.insert(at, extra[i])
        values.append(few[which[i]])
        want.append(tuple(values))
    assert built.wire == _wire(want)
    assert list(built) == want


ARRAYS = {1021: "real", 1022: "float8", 1005: "smallint", 1007: "int", 1016: "bigint"}


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(sorted(ARRAYS)),
    st.integers(1, 20),
    st.integers(0, 9),
    st.booleans(),
)
def test_numeric_arrays_read_as_one_matrix(oid: int, n: int, width: int, null_element: bool) -> None:
    """The matrix equals psycopg's binary loader, row by row; arrays with a NULL element (or
    no elements) are left to the row path."""
    from planner.values import BINARY_ARRAYS

    rng = np.random.default_rng(n * 31 + width)
    values = rng.integers(-100, 100, size=(n, width)).tolist()
    if null_element and width:
        values[0][0] = None
    tx = psycopg.adapt.Transformer()
    cls = psycopg.adapters.get_dumper_by_oid(oid, Format.BINARY)
    dumper = cls(list, tx)
    wire = [bytes(dumper.dump(v) or b"") for v in values]
    block = datarows.RowBlock(_wire([(w,) for w in wire]))
    (col,) = datarows.columns(block, 1)
    matrix = datarows.numeric_matrix(col, BINARY_ARRAYS[oid])
    if (null_element and width) or width == 0:
        assert matrix is None
        return
    assert matrix is not None and matrix.shape == (n, width)
    loader = tx.get_loader(oid, Format.BINARY)
    assert matrix.tolist() == [list(loader.load(w)) for w in wire]


def test_uniform_run_stops_where_rows_change_length() -> None:
    rows = [(b"1234",)] * 5 + [(b"12",)] + [(b"1234",)] * 2
    wire = _wire(rows)
    one = len(datarows.encode_data_row(rows[0]))
    assert datarows.uniform_run(wire) == 5 * one
    assert datarows.uniform_run(wire[: 3 * one + 2]) == 3 * one  # a partial row is left
    assert datarows.uniform_run(b"Z\x00\x00\x00\x05I") == 0
    assert datarows.uniform_run(b"") == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x09",  # a field longer than its message
        b"D\x00\x00\x00\x06\x00\x01",  # a field count with no field
        b"D\x00\x00\x00\x0a\x00\x01\xff\xff\xff\xfe",  # a negative length other than -1
        datarows.encode_data_row([b"a"]) + b"C\x00\x00\x00\x04",  # another message inside
        datarows.encode_data_row([b"a"])[:-1],  # cut short
    ],
)
def test_malformed_blocks_are_protocol_violations(wire: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        block = datarows.RowBlock(wire)
        datarows.columns(block, 1)
        list(block)


def test_field_count_must_match_the_description() -> None:
    block = datarows.RowBlock(_wire([(b"a", b"b")]))
    with pytest.raises(ProtocolViolation):
        datarows.columns(block, 1)


def test_struct_layout_is_the_protocols() -> None:
    """A DataRow is 'D', its length counting itself, the field count, then (length, bytes)."""
    assert datarows.encode_data_row([b"ab", None]) == b"D" + struct.pack("!ihi2si", 16, 2, 2, b"ab", -1)
