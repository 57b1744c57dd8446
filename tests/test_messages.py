"""Byte fixtures for every message proxy/messages.py builds or reads, and the framer.

Each fixture is the exact bytes Postgres (or libpq) puts on the wire, written out by
hand from the protocol documentation, so encode and parse are checked against the
standard rather than against each other only.
"""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import ProtocolViolation
from core.interfaces import Column
from proxy import messages as m

CASES: list[tuple[Any, bytes]] = [
    (m.Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (m.Parse("s1", "SELECT $1", (23,)), b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"),
    (m.Bind("", "s1", (1,), (b"\x00\x00\x00\x05", None), (0,)),
     b"B\x00\x00\x00\x1e\x00s1\x00\x00\x01\x00\x01\x00\x02\x00\x00\x00\x04\x00\x00\x00\x05"
     b"\xff\xff\xff\xff\x00\x01\x00\x00"),
    (m.Describe("S", "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
    (m.Close("P", ""), b"C\x00\x00\x00\x06P\x00"),
    (m.Execute("", 10), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x0a"),
    (m.ReadyForQuery("T"), b"Z\x00\x00\x00\x05T"),
    (m.ParameterStatus("TimeZone", "UTC"), b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"),
    (m.BackendKeyData(1234, -5), b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xff\xff\xff\xfb"),
    (m.CommandComplete("SELECT 3"), b"C\x00\x00\x00\x0dSELECT 3\x00"),
    (m.ErrorResponse({"S": "ERROR", "C": "22012", "M": "division by zero"}),
     b"E\x00\x00\x00\x25SERROR\x00C22012\x00Mdivision by zero\x00\x00"),
    (m.ErrorResponse({"S": "NOTICE", "M": "hi"}, notice=True), b"N\x00\x00\x00\x11SNOTICE\x00Mhi\x00\x00"),
    (m.RowDescription((Column("a", 23, 0, 0, 4, -1, 0),)),
     b"T\x00\x00\x00\x1a\x00\x01a\x00\x00\x00\x00\x00\x00\x00"
     b"\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"),
    (m.ParameterDescription((25, 4294967295)),
     b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x19\xff\xff\xff\xff"),
    (m.DataRow((b"1", None, b"")),
     b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00"),
    (m.NegotiateProtocolVersion(0, ("_pq_.x",)),
     b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00"),
]


@pytest.mark.parametrize(("msg", "wire"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_round_trip(msg: Any, wire: bytes) -> None:
    assert msg.encode() == wire
    notice = {"notice": True} if isinstance(msg, m.ErrorResponse) and msg.notice else {}
    assert type(msg).parse(wire[5:], **notice) == msg


def test_startup_and_cancel_round_trip() -> None:
    wire = b"\x00\x00\x00\x12\x00\x03\x00\x00user\x00bob\x00\x00"
    msg = m.StartupMessage({"user": "bob"})
    assert msg.encode() == wire
    assert m.StartupMessage.parse(wire[4:]) == msg
    cancel = m.CancelRequest(7, 99)
    assert cancel.encode() == b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07\x00\x00\x00\x63"
    assert m.CancelRequest.parse(cancel.encode()[4:]) == cancel


def test_constant_messages() -> None:
    assert m.SYNC == b"S\x00\x00\x00\x04"
    assert m.FLUSH == b"H\x00\x00\x00\x04"
    assert m.PARSE_COMPLETE == b"1\x00\x00\x00\x04"
    assert m.AUTH_OK == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.copy_data(b"ab") == b"d\x00\x00\x00\x06ab"


def test_framer_splits_across_feeds() -> None:
    wire = m.Query("SELECT 1").encode() + m.SYNC + m.Execute("p", 0).encode()
    fr = m.Framer()
    seen: list[tuple[int, bytes]] = []
    for i in range(0, len(wire), 3):  # three bytes at a time: messages straddle the feeds
        fr.feed(wire[i : i + 3])
        msgs, used = fr.scan()
        seen += [(t, bytes(fr.buf[s:e])) for t, s, e in msgs]
        fr.drop(used)
    assert [t for t, _ in seen] == [ord("Q"), ord("S"), ord("E")]
    assert b"".join(raw for _, raw in seen) == wire
    assert not fr.buf


def test_framer_generator_form() -> None:
    fr = m.Framer()
    fr.feed(m.SYNC + m.FLUSH + b"Q\x00")
    assert [(t, e - s) for t, s, e in fr.messages()] == [(ord("S"), 5), (ord("H"), 5)]
    assert bytes(fr.buf) == b"Q\x00"


def test_framer_rejects_oversized_and_bad_lengths() -> None:
    fr = m.Framer(max_size=100)
    fr.feed(b"Q\x00\x00\x10\x00")
    with pytest.raises(ProtocolViolation, match="limit is 100 bytes"):
        fr.scan()
    fr = m.Framer()
    fr.feed(b"Q\x00\x00\x00\x02")
    with pytest.raises(ProtocolViolation):
        fr.scan()


def test_truncated_body_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        m.Bind.parse(b"\x00s1\x00\x00\x05")
    with pytest.raises(ProtocolViolation):
        m.Query.parse(b"SELECT 1")  # no NUL terminator
    with pytest.raises(ProtocolViolation):
        m.Describe.parse(b"Xname\x00")


def test_parse_options() -> None:
    opts = r"-c search_path=a,b --statement-timeout=5s -c application_name=my\ app"
    assert m.parse_options(opts) == {
        "search_path": "a,b", "statement_timeout": "5s", "application_name": "my app",
    }
    assert m.parse_options("") == {}
    with pytest.raises(ProtocolViolation):
        m.parse_options("-c novalue")
