"""proxy/session.py without sockets: frontend byte streams in, routes and decisions out; the
upstream's byte streams into `Replies`, what reaches the client out.

Each fixture is the bytes a client writes (built with proxy/messages.py and framed as on
the wire); `Drive` feeds them to a `Session` the way `Frontend` does (a forwarded message
owes its `Reply`, a Sync is forwarded or answered) and plays the upstream's part where a
case needs one (an error in the batch, a ReadyForQuery's status).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.interfaces import Column
from proxy import messages as m
from proxy.session import (
    Copy,
    Expect,
    Fed,
    Leave,
    Phase,
    Replies,
    Reply,
    Route,
    Session,
    Swallow,
    SyncAnswer,
    plain,
)

BAD_OID_PARSE = m.Parse("", "select $1", (999999,)).encode() + m.FLUSH
BAD_FLUSH = b"H" + struct.pack("!i", 5) + b"x"
EXTENDED_SELECT = (m.Parse("", "select 1").encode() + m.Bind("", "").encode()
                   + m.Describe("P", "").encode() + m.Execute("").encode())


class Drive:
    """Feeds framed client bytes to a Session as the frontend does; records routes and answers."""

    def __init__(self, transaction_pooling: bool) -> None:
        self.s = Session(transaction_pooling, phase=Phase.READY)
        self.routes: list[Route] = []
        self.syncs: list[SyncAnswer] = []
        self.owed: list[Reply] = []

    def client(self, data: bytes) -> None:
        msgs, used = m.scan(data, 1 << 20)
        assert used == len(data)
        for t, s, e in msgs:
            route = self.s.route(t)
            self.routes.append(route)
            if route is Route.EXTENDED or route is Route.QUERY:
                reply = Reply.to(t)
                self.owed.append(reply)
                self.s.forwarded(reply)
            elif route is Route.FLUSH and e - s > 5:  # a body: relayed, its error comes unasked
                self.s.forwarded(Reply.NOTHING)
            elif route is Route.SYNC:
                answer = self.s.sync(attached=True)
                self.syncs.append(answer)
                if answer is SyncAnswer.FORWARD:
                    self.owed.append(Reply.READY)

    def server_error(self) -> None:
        """The upstream's ErrorResponse in the current batch: the owed non-Z replies are skipped."""
        self.s.failed()
        self.owed = [r for r in self.owed if r is Reply.READY]

    def server_ready(self) -> None:
        self.owed.remove(Reply.READY)


@pytest.mark.parametrize("pooling", [False, True])
def test_unsynced_error_then_vanish_finishes_the_exchange(pooling: bool) -> None:
    d = Drive(pooling)
    d.client(BAD_OID_PARSE)
    d.server_error()  # XX000 cache lookup failed; the upstream now skips to Sync
    assert d.routes == [Route.EXTENDED, Route.FLUSH] and d.s.sync_owed
    assert d.s.leave(len(d.owed), "I", internal=False) is Leave.FINISH
    assert d.s.phase is Phase.CLOSED


def test_skip_to_sync_then_a_fresh_batch() -> None:
    d = Drive(True)
    d.client(m.Parse("", "select 1/0").encode())
    d.server_error()
    d.client(m.Bind("", "").encode() + m.Execute("").encode() + m.FLUSH + m.SYNC)
    assert d.routes == [Route.EXTENDED, Route.SKIP, Route.SKIP, Route.FLUSH, Route.SYNC]
    assert d.syncs == [SyncAnswer.FORWARD]  # the upstream owes the ReadyForQuery, not us
    d.client(EXTENDED_SELECT)
    assert d.routes[-4:] == [Route.EXTENDED] * 4


def test_malformed_flush_makes_its_sync_the_upstreams() -> None:
    d = Drive(False)
    d.client(m.Query("select 1").encode() + BAD_FLUSH + m.SYNC + m.Query("select 2").encode())
    assert d.routes == [Route.QUERY, Route.FLUSH, Route.SYNC, Route.QUERY]
    assert d.syncs == [SyncAnswer.FORWARD]
    assert d.owed == [Reply.READY, Reply.READY, Reply.READY]  # nothing answered by the proxy


def test_sync_with_nothing_upstream_is_answered_here() -> None:
    d = Drive(True)
    d.client(m.SYNC)
    assert d.syncs == [SyncAnswer.ANSWER] and d.s.batch == 1


def test_release_only_between_transactions_with_nothing_owed() -> None:
    d = Drive(True)
    d.client(EXTENDED_SELECT)
    assert not d.s.may_release(len(d.owed), "I", internal=False)  # Sync still owed
    d.client(m.SYNC)
    assert not d.s.may_release(len(d.owed), "I", internal=False)  # replies still owed
    assert d.s.may_release(0, "I", internal=False)
    assert not d.s.may_release(0, "T", internal=False)
    assert not d.s.may_release(0, "E", internal=False)
    assert not d.s.may_release(0, "I", internal=True)
    d.s.holding = True
    assert not d.s.may_release(0, "I", internal=False)
    assert not Drive(False).s.may_release(0, "I", internal=False)  # session pooling: never


@pytest.mark.parametrize(("pooling", "owed", "status", "expected"), [
    (True, 0, "I", Leave.RELEASE),
    (True, 0, "T", Leave.FINISH),
    (False, 0, "I", Leave.FINISH),  # session pooling always resets
    (False, 1, "I", Leave.CANCEL_AND_CLOSE),
    (True, 2, "T", Leave.CANCEL_AND_CLOSE),
])
def test_leave(pooling: bool, owed: int, status: str, expected: Leave) -> None:
    assert Session(pooling, phase=Phase.READY).leave(owed, status, internal=False) is expected


def test_function_call_copy_terminate_and_invalid() -> None:
    d = Drive(False)
    fcall = m.frame(b"F", struct.pack("!ihhih", 764, 0, 1, 4, 0) + b"\0\0\0\0")
    d.client(fcall + m.copy_data(b"1\n") + m.COPY_DONE)
    assert d.routes == [Route.FUNCTION_CALL, Route.COPY, Route.COPY]
    assert d.s.route(ord("y")) is Route.INVALID
    assert d.s.route(ord("X")) is Route.TERMINATE and d.s.phase is Phase.CLOSING


def test_replies_end_where_postgres_ends_them() -> None:
    assert all(ord(c) in Reply.EXECUTE for c in "CsI") and ord("D") not in Reply.EXECUTE
    assert ord("t") not in Reply.DESCRIBE and ord("T") in Reply.DESCRIBE  # ParameterDescription first
    assert Reply.to(0x42) is Reply.BIND and Reply.to(0x43) is Reply.CLOSE and bytes(Reply.READY) == b"Z"


def test_unpoolable_statements() -> None:
    from proxy.session import refusal_sql, unpoolable

    assert unpoolable(b"  LISTEN chan", "I") == "LISTEN"
    assert unpoolable(b"listen chan", "T") is None  # takes effect at COMMIT; a rollback leaves nothing
    assert unpoolable(b"select pg_advisory_lock(1)", "T") == "a session advisory lock"
    assert unpoolable(b"select pg_advisory_xact_lock(1)", "I") is None  # released at transaction end
    assert unpoolable(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", "T") == "a WITH HOLD cursor"
    assert unpoolable(b"select 1 /* listen */", "I") is None
    assert "feature_not_supported" in refusal_sql("LISTEN") and not Swallow.NONE and Swallow.ALL > Swallow.OK


# --- Replies: what a server connection owes, fed the upstream's bytes ----------------------

def _select_reply(value: bytes, status: str = "I") -> bytes:
    """What Postgres answers to `select <value>` as a simple Query."""
    return (m.RowDescription((Column("v", 23),)).encode() + m.DataRow((value,)).encode()
            + m.CommandComplete("SELECT 1").encode() + m.ReadyForQuery(status).encode())


def _feed(r: Replies, data: bytes) -> Fed:
    msgs, used = m.scan(data, 1 << 20)
    return r.feed(data, msgs, used)


class _Track:
    """A Tracker that records what the replies settle."""

    def __init__(self) -> None:
        self.rows: list[bytes] = []
        self.completed = 0
        self.closed: list[int] = []

    def row(self, body: bytes) -> None:
        self.rows.append(body)

    def complete(self) -> None:
        self.completed += 1

    def close(self, t: int) -> None:
        self.closed.append(t)


def test_a_query_reply_goes_on_as_it_came() -> None:
    r = Replies()
    r.expect(Expect(Reply.READY, 0))
    reply = _select_reply(b"1", "T")
    fed = _feed(r, reply)
    assert fed.data == reply and fed.ready and fed.failed is None and not r.queue
    assert r.tx_status == "T"


def test_a_pipeline_reply_ends_every_owed_entry() -> None:
    r = Replies()
    for reply in (Reply.PARSE, Reply.BIND, Reply.DESCRIBE, Reply.EXECUTE, Reply.READY):
        r.expect(Expect(reply, 0))
    data = m.PARSE_COMPLETE + m.BIND_COMPLETE + _select_reply(b"7")
    half = len(m.PARSE_COMPLETE + m.BIND_COMPLETE) + 3  # a read may end inside a message
    msgs, used = m.scan(data[:half], 1 << 20)
    first = r.feed(data[:half], msgs, used)
    assert first.data == data[:used] and not first.ready and len(r) == 3
    rest = data[used:]
    fed = _feed(r, rest)
    assert fed.data == rest and fed.ready and not r.queue


def test_the_proxys_own_replies_are_swallowed_and_tracked() -> None:
    r = Replies()
    track = _Track()
    r.expect(Expect(Reply.READY, 0, Swallow.ALL, track=track))  # e.g. the settings capture
    r.expect(Expect(Reply.READY, 0))
    own, client = _select_reply(b"42"), _select_reply(b"1")
    fed = _feed(r, own + client)
    assert fed.data == client and fed.ready and not r.queue
    assert track.rows == [m.DataRow((b"42",)).encode()[5:]] and track.completed == 1
    assert track.closed == [ord("Z")]


def test_a_failed_replay_is_relayed_and_the_batch_skips_to_sync() -> None:
    r = Replies()
    replay, parse, bind = _Track(), _Track(), _Track()
    r.expect(Expect(Reply.PARSE, 3, Swallow.OK, track=replay))  # the proxy prepares again
    r.expect(Expect(Reply.PARSE, 3, track=parse))
    r.expect(Expect(Reply.BIND, 3, track=bind))
    r.expect(Expect(Reply.READY, 3, sync=True))
    error = m.error_message({"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "no such table"})
    fed = _feed(r, error)
    assert fed.data == error and fed.failed == [3]
    assert [len(t.closed) for t in (replay, parse, bind)] == [1, 1, 1]  # undone, latest first
    assert [e.terminals for e in r.queue] == [Reply.READY]
    fed = _feed(r, m.ReadyForQuery("I").encode())
    assert fed.ready and not r.queue


def test_a_query_sent_before_the_sync_of_a_failed_batch_is_owed_nothing() -> None:
    """Execute, Query, FunctionCall, Sync in one write: after the Execute's error Postgres
    ignores the Query and the FunctionCall (no reply at all) and answers the Sync, so their
    entries go with the batch's and the Sync's ReadyForQuery ends what is owed; the next
    Query's entry stays."""
    r = Replies()
    query = _Track()
    r.expect(Expect(Reply.EXECUTE, 2))
    r.expect(Expect(Reply.READY, 2, track=query))  # the Query (a tracked one, e.g. a SET)
    r.expect(Expect(Reply.READY, 2))  # the FunctionCall
    r.expect(Expect(Reply.READY, 2, sync=True))
    r.expect(Expect(Reply.READY, 3))  # a Query after the Sync: Postgres runs it
    error = m.error_message({"S": "ERROR", "V": "ERROR", "C": "22012", "M": "division by zero"})
    fed = _feed(r, error + m.ReadyForQuery("I").encode())
    assert fed.failed == [2] and fed.ready and query.closed == [0]  # undone: it never ran
    assert [(e.terminals, e.batch) for e in r.queue] == [(Reply.READY, 3)]


def test_a_synthetic_answer_waits_for_what_is_owed_before_it() -> None:
    r = Replies()
    r.expect(Expect(Reply.PARSE, 0))
    assert r.expect(Expect(Reply.NOTHING, 0, synthetic=m.CLOSE_COMPLETE)) is None  # behind the Parse
    fed = _feed(r, m.PARSE_COMPLETE)
    assert fed.data == m.PARSE_COMPLETE + m.CLOSE_COMPLETE and not r.queue
    assert r.expect(Expect(Reply.NOTHING, 0, synthetic=m.CLOSE_COMPLETE)) == m.CLOSE_COMPLETE  # at once


def test_an_unasked_error_between_replies_keeps_postgres_order() -> None:
    """Query, a Flush with a body, Sync, Query: Postgres's own order, byte for byte."""
    r = Replies()
    for _ in range(3):
        r.expect(Expect(Reply.READY, 0))
    error = m.error_message({"S": "ERROR", "V": "ERROR", "C": "08P01", "M": "invalid message format"})
    data = _select_reply(b"1") + error + m.ReadyForQuery("I").encode() + _select_reply(b"2")
    fed = _feed(r, data)
    assert fed.data == data and fed.failed == [-1] and not r.queue


def test_copy_state_status_and_parameters() -> None:
    r = Replies()
    r.expect(Expect(Reply.READY, 0))
    _feed(r, m.frame(b"G", b"\0\0\0"))
    states = [r.copy]
    fed = _feed(r, m.ParameterStatus("TimeZone", "UTC").encode() + m.CommandComplete("COPY 2").encode())
    states.append(r.copy)
    assert states == [Copy.IN, Copy.NONE] and fed.params == [("TimeZone", "UTC")] and not fed.ready
    fed = _feed(r, m.ReadyForQuery("E").encode())
    assert fed.ready and r.tx_status == "E"


def test_a_fatal_error_is_remembered_by_its_untranslated_severity() -> None:
    r = Replies()
    r.expect(Expect(Reply.READY, 0))
    fatal = m.error_message({"S": "FATAL-IN-ANOTHER-LANGUAGE", "V": "FATAL", "C": "57P01", "M": "bye"})
    fed = _feed(r, fatal)
    assert fed.data == fatal and r.said_fatal


# Server messages a reply can hold, by type: the plain ones and the ones that need `feed`'s
# decisions (an error, a ParameterStatus, the start of a COPY).
_SERVER_MESSAGES = [
    m.RowDescription((Column("v", 23),)).encode(), m.DataRow((b"1",)).encode(),
    m.CommandComplete("SELECT 1").encode(), m.PARSE_COMPLETE, m.BIND_COMPLETE, m.CLOSE_COMPLETE,
    m.frame(b"n", b""), m.frame(b"s", b""), m.frame(b"I", b""), m.ReadyForQuery("T").encode(),
    m.ReadyForQuery("I").encode(), m.frame(b"G", b"\0\0\0"), m.ParameterStatus("TimeZone", "UTC").encode(),
    m.error_message({"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "no such table"}),
]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(
    owed=st.lists(st.sampled_from([Reply.PARSE, Reply.BIND, Reply.DESCRIBE, Reply.EXECUTE, Reply.READY]),
                  max_size=6),
    tracked=st.integers(min_value=-1, max_value=5),
    replies=st.lists(st.sampled_from(_SERVER_MESSAGES), max_size=8),
    cut=st.integers(min_value=0, max_value=8),
)
def test_the_one_pass_relay_decides_as_feed_does(owed: list[Reply], tracked: int, replies: list[bytes],
                                                 cut: int) -> None:
    """`Replies.relay` (framing and the common case in one pass) either declines, changing
    nothing, or comes to what `scan` then `feed` come to: the bytes, the end of a response,
    the queue, the status and the COPY state; a read may end inside a message."""
    data = b"".join(replies)
    data = data[: max(0, len(data) - cut)]

    def queued() -> Replies:
        r = Replies()
        for i, reply in enumerate(owed):
            r.expect(Expect(reply, 0, track=_Track() if i == tracked else None))
        return r

    def state(r: Replies) -> tuple[object, ...]:
        return [e.terminals for e in r.queue], r.tx_status, r.copy, r.said_fatal

    one, two = queued(), queued()
    before = state(one)
    relayed = one.relay(data, 1 << 20)
    if relayed is None:
        assert state(one) == before
        return
    msgs, used = m.scan(data, 1 << 20)
    fed = two.feed(data, msgs, used)
    assert relayed == (used, fed.ready) and bytes(fed.data) == data[:used]
    assert fed.failed is None and fed.params is None and state(one) == state(two)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["SELECT", "set", "Se", "t", "pgML", "all", "a", "1", "42", " ", "x",
                                 "TEMP", "hold", "Listen", "timeout", "'", ";", "e", "P"]), max_size=12),
       st.integers(min_value=1, max_value=3))
def test_plain_answers_as_its_search_by_shape(words: list[str], repeats: int) -> None:
    """`plain` remembers its answers by shape (lowered, digits left out): asked again, or for
    a statement differing in its digits, it never clears what the search would not, and it
    clears what has no digits exactly as the search does."""
    from proxy.session import _SPECIAL

    text = "".join(words).encode()
    msg = m.Query(text.decode()).encode()
    for _ in range(repeats):
        searched = _SPECIAL.search(msg.lower()) is None
        if plain(msg):
            assert searched
        elif not any(c.isdigit() for c in text.decode()):
            assert not searched
        assert plain(msg.replace(b"1", b"7")) is plain(msg)  # the same shape, one answer
