"""The client session's protocol state, sans-IO: what phase it is in and what follows from it.

Owns the phase of one client session (startup, auth, ready, closing, closed), its
extended-query batch (the batch number, whether a Sync is owed upstream, whether the
batch failed so messages are skipped to Sync), whether the planner holds the server
connection, the kinds of reply the upstream can owe (`Reply`), and the decisions that
depend on all of these: how a Sync is answered, whether the server connection may go
back to the pool, what becomes of it when the client vanishes, and what a transaction-pooled
session cannot keep (`unpoolable`). No sockets, no
asyncio: `proxy.frontend.Frontend` feeds it events and carries out what it answers;
tests/test_session_machine.py drives it with byte fixtures.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Phase(enum.Enum):
    STARTUP = "startup"  # untyped packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage
    AUTH = "auth"  # the authentication exchange; messages queue until login is done
    READY = "ready"  # logged in: messages are routed
    CLOSING = "closing"  # Terminate received
    CLOSED = "closed"


class Reply(bytes, enum.Enum):
    """What the upstream owes for one forwarded message: the message types that end it.

    A bytes enum, so the relay's hot path tests `t in head.terminals` as before.
    """

    PARSE = b"1"
    BIND = b"2"
    CLOSE = b"3"
    DESCRIBE = b"Tn"  # RowDescription or NoData (after ParameterDescription for a statement)
    EXECUTE = b"CsI"  # CommandComplete, PortalSuspended or EmptyQueryResponse
    READY = b"Z"  # a simple Query, a FunctionCall, a Sync
    NOTHING = b""  # a synthetic answer of the proxy's own, queued behind what is owed

    @classmethod
    def to(cls, t: int) -> Reply:
        """The reply an extended-protocol message of type `t` (Bind, Close, Describe) is owed."""
        return _BY_TYPE[t]


_BY_TYPE = {0x50: Reply.PARSE, 0x42: Reply.BIND, 0x43: Reply.CLOSE, 0x44: Reply.DESCRIBE,
            0x45: Reply.EXECUTE, 0x51: Reply.READY, 0x46: Reply.READY, 0x53: Reply.READY}


class Swallow(enum.IntEnum):
    """What reaches the client of a response the proxy asked for itself (a replayed statement)."""

    NONE = 0  # the client's own: relayed
    OK = 1  # the proxy's, relayed only if it fails (the client's batch fails with it)
    ALL = 2  # the proxy's, never relayed


class Route(enum.Enum):
    """Where a client message goes, by its type byte (and the batch's state)."""

    QUERY = "query"
    EXTENDED = "extended"  # Parse, Bind, Describe, Execute, Close
    FLUSH = "flush"  # never skipped: the client may wait for what came before the error
    SYNC = "sync"
    SKIP = "skip"  # an extended message after an error, before Sync: ignored, as Postgres does
    COPY = "copy"  # CopyData, CopyDone, CopyFail
    FUNCTION_CALL = "function call"
    TERMINATE = "terminate"
    INVALID = "invalid"  # Postgres answers 08P01 and closes


_ROUTES = {
    0x51: Route.QUERY, 0x50: Route.EXTENDED, 0x42: Route.EXTENDED, 0x44: Route.EXTENDED,
    0x45: Route.EXTENDED, 0x43: Route.EXTENDED, 0x48: Route.FLUSH, 0x53: Route.SYNC,
    0x64: Route.COPY, 0x63: Route.COPY, 0x66: Route.COPY, 0x46: Route.FUNCTION_CALL,
    0x58: Route.TERMINATE,
}


class SyncAnswer(enum.Enum):
    FORWARD = "forward"  # the upstream has part of this batch: its ReadyForQuery answers
    ANSWER = "answer"  # nothing of the batch went upstream: the proxy answers ReadyForQuery


class Leave(enum.Enum):
    """What becomes of the server connection when its client vanishes."""

    RELEASE = "release"  # clean (nothing owed, no transaction, no Sync owed): straight back
    FINISH = "finish"  # Sync if owed, drain to ReadyForQuery, ROLLBACK, reset; bounded, else closed
    CANCEL_AND_CLOSE = "cancel and close"  # a response is still running: stop it, never reuse


@dataclass(slots=True)
class Session:
    """One client's protocol state; `transaction_pooling` says when a server goes back."""

    transaction_pooling: bool
    phase: Phase = Phase.STARTUP
    batch: int = 0  # numbered extended-query batches (each ends at Sync)
    failed_batch: int = -1  # the batch whose error makes the rest of it skip to Sync
    sync_owed: bool = False  # part of the current batch went upstream: its Sync must too
    holding: bool = False  # the planner runs its own requests on the server connection

    @property
    def skipping(self) -> bool:
        """After an error in the extended protocol, messages up to Sync are ignored."""
        return self.failed_batch == self.batch

    def route(self, t: int) -> Route:
        """Where a client message of type `t` goes."""
        route = _ROUTES.get(t, Route.INVALID)
        if route is Route.EXTENDED and self.skipping:
            return Route.SKIP
        if route is Route.TERMINATE:
            self.phase = Phase.CLOSING
        return route

    def forwarded(self, reply: Reply) -> None:
        """A message went upstream owing `reply`: anything but a ReadyForQuery opens the batch."""
        if reply is not Reply.READY:
            self.sync_owed = True

    def failed(self, batch: int | None = None) -> None:
        """The batch (the current one by default) got an error: skip the rest to its Sync."""
        self.failed_batch = self.batch if batch is None else batch

    def sync(self, attached: bool) -> SyncAnswer:
        """A Sync from the client: the next batch begins; who answers it."""
        answer = SyncAnswer.FORWARD if attached and self.sync_owed else SyncAnswer.ANSWER
        self.batch += 1
        self.sync_owed = False
        return answer

    def may_release(self, owed: int, status: str, internal: bool) -> bool:
        """Transaction pooling: the server goes back once the client is between transactions."""
        return (self.transaction_pooling and not self.holding and not owed and status == "I"
                and not internal and not self.sync_owed)

    def leave(self, owed: int, status: str, internal: bool, dirty: bool = False) -> Leave:
        """The client vanished: how its server connection comes back clean, if at all.

        `owed`: responses still owed; `status`: the server's transaction status; `internal`:
        the proxy's own request is on it; `dirty`: transaction pooling's bookkeeping is mid-way.
        """
        self.phase = Phase.CLOSED
        if owed or self.holding or internal or dirty:
            return Leave.CANCEL_AND_CLOSE
        if not self.transaction_pooling or status != "I" or self.sync_owed:
            return Leave.FINISH
        return Leave.RELEASE


# What outlives a transaction on its server connection, so transaction pooling cannot keep it
# for the client: a LISTEN committed on its own, WITH HOLD cursors, session advisory locks.
_UNPOOLABLE = re.compile(
    rb"(?is)\A\s*(?P<listen>listen)\b|\b(?P<hold>with\s+hold)\b"
    rb"|\b(?P<lock>pg_(?:try_)?advisory_lock(?:_shared)?)\s*\("
)
_WHAT = {"listen": "LISTEN", "hold": "a WITH HOLD cursor", "lock": "a session advisory lock"}


def unpoolable(sql: bytes | memoryview, tx_status: str) -> str | None:
    """What in `sql` transaction pooling cannot keep for the client, or None.

    A LISTEN inside a transaction block is let through (it takes effect at COMMIT, and a
    rolled-back one leaves nothing); on its own it would stay on a connection others use.
    """
    for match in _UNPOOLABLE.finditer(sql):
        kind = match.lastgroup or ""
        if kind != "listen" or tx_status == "I":
            return _WHAT[kind]
    return None


def refusal_sql(what: str) -> str:
    """A statement that fails as the refusal of `what`: sent in place of the client's, so the
    error comes in order and aborts an open transaction block as any failed statement does."""
    message = f"{what} cannot be kept under pool_mode=transaction"
    hint = "it would stay on a server connection that other clients use; use pool_mode=session"
    return ("DO $pgmlproxy$BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', "
            f"MESSAGE = '{message}', HINT = '{hint}'; END$pgmlproxy$")
