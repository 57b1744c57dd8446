"""proxy/session.py without sockets: frontend byte streams in, routes and decisions out.

Each fixture is the bytes a client writes (built with proxy/messages.py and framed as on
the wire); `Drive` feeds them to a `Session` the way `Frontend` does (a forwarded message
owes its `Reply`, a Sync is forwarded or answered) and plays the upstream's part where a
case needs one (an error in the batch, a ReadyForQuery's status).
"""

from __future__ import annotations

import struct

import pytest

from proxy import messages as m
from proxy.session import Leave, Phase, Reply, Route, Session, SyncAnswer

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
    from proxy.session import Swallow, refusal_sql, unpoolable

    assert unpoolable(b"  LISTEN chan", "I") == "LISTEN"
    assert unpoolable(b"listen chan", "T") is None  # takes effect at COMMIT; a rollback leaves nothing
    assert unpoolable(b"select pg_advisory_lock(1)", "T") == "a session advisory lock"
    assert unpoolable(b"select pg_advisory_xact_lock(1)", "I") is None  # released at transaction end
    assert unpoolable(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", "T") == "a WITH HOLD cursor"
    assert unpoolable(b"select 1 /* listen */", "I") is None
    assert "feature_not_supported" in refusal_sql("LISTEN") and not Swallow.NONE and Swallow.ALL > Swallow.OK
