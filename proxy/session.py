"""The client session's protocol state, sans-IO: what phase it is in and what follows from it.

Two objects, no sockets and no asyncio, driven by tests/test_session_machine.py with byte
fixtures and carried out by thin adapters (`proxy.frontend.Frontend` for the client,
`proxy.backend.ServerConn` for a server connection):

- `Session`, one per client: its phase (startup, auth, ready, closing, closed), its
  extended-query batch (the batch number, whether a Sync is owed upstream, whether the batch
  failed so messages are skipped to Sync), whether the planner holds the server connection,
  and the decisions that depend on these: where a client message goes (`route`), how a Sync
  is answered, whether the server connection may go back to the pool, what becomes of it when
  the client vanishes, and what a transaction-pooled session cannot keep (`unpoolable`).
- `Replies`, one per server connection: the responses its forwarded messages still owe
  (`Expect`, in order, each ended by the message types of its `Reply`), the transaction status
  and COPY state the server last reported, and the decision, message by message, of what
  reaches the client: relayed as sent, swallowed (the proxy's own requests), or followed by a
  synthetic answer of the proxy's own in its turn (never before what the upstream still owes).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from proxy import messages as m


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


_SKIPPED = frozenset({Route.EXTENDED, Route.QUERY, Route.FUNCTION_CALL})


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
        # Postgres ignores every message but Sync and Terminate then: a simple Query or a
        # FunctionCall too, which get no reply at all (postgres.c, ignore_till_sync).
        if self.skipping and route in _SKIPPED:
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

    def relayed_batch(self) -> None:
        """A whole extended batch and its Sync went upstream as one (Frontend._relay_batch):
        the upstream answers the Sync, and the next batch begins."""
        self.batch += 1
        self.sync_owed = False

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


# The words `plain` looks for, lowered; a regex over lowered bytes costs a fifth of the same
# search with IGNORECASE, and of as many substring tests.
_SPECIAL = re.compile(rb"pgml|set|all|timeout|prepare|execute|deallocate|discard|listen|hold|advisory|temp")


# `plain`'s answers by the message's shape: its bytes lowered (ASCII, as bytes.lower) with
# the digits left out, so statements that differ in their numbers only (pgbench's, any
# application's with literals) share one answer. Leaving digits out never hides a word (none
# has a digit); it may make one ("se1t"), which only costs the full tests.
_FOLD = bytes.maketrans(bytes(range(ord("A"), ord("Z") + 1)), bytes(range(ord("a"), ord("z") + 1)))
_DIGITS = b"0123456789"
_SHAPES: dict[bytes, bool] = {}
_SHAPES_MAX = 4096  # then forgotten all at once: a bound, for clients whose every statement differs
_SHAPE_LEN = 1024  # longer messages (bulk INSERTs) are searched every time, and not kept


def plain(msg: bytes) -> bool:
    """Whether a Query's or Parse's bytes hold none of the words that any part of the session
    looks for: pgml calls, statement_timeout, SET/RESET/DISCARD/PREPARE/EXECUTE/DEALLOCATE
    (proxy.txstate), LISTEN, WITH HOLD, advisory locks and temporary tables (`unpoolable`).

    Such a message is relayed with no further test. A word inside another ("offset", "call")
    only costs the full tests, never a wrong answer.
    """
    if len(msg) > _SHAPE_LEN:
        return _SPECIAL.search(msg.lower()) is None
    shape = msg.translate(_FOLD, _DIGITS)
    known = _SHAPES.get(shape)
    if known is None:  # the regex costs about ten times the lookup
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        known = _SHAPES[shape] = _SPECIAL.search(shape) is None
    return known


# What outlives a transaction on its server connection, so transaction pooling cannot keep it
# for the client: a LISTEN committed on its own, WITH HOLD cursors, session advisory locks.
_UNPOOLABLE = re.compile(
    rb"(?is)\A\s*(?P<listen>listen)\b|\b(?P<hold>with\s+hold)\b"
    rb"|\b(?P<lock>pg_(?:try_)?advisory_lock(?:_shared)?)\s*\("
)
_WHAT = {"listen": "LISTEN", "hold": "a WITH HOLD cursor", "lock": "a session advisory lock"}
# A temporary table, sequence or view made on its own, outside a transaction block; what
# follows it in the same Query (it runs in the same implicit transaction) may use it.
_TEMP_ALONE = re.compile(
    rb"(?is)\A\s*create\s+(?:(?:global|local)\s+)?temp(?:orary)?\s+(?:unlogged\s+)?"
    rb"(?:table|sequence|view|recursive\s+view)\b(?P<rest>[^;]*)(?:;[\s\x00]*)?[\x00]?\Z"
)
_ON_COMMIT_DROP = re.compile(rb"(?i)\bon\s+commit\s+drop\b")
# Text that may make temporary objects (a false yes costs one DISCARD TEMP).
TEMP_WORDS = re.compile(rb"(?i)\btemp(?:orary)?\b|\bpg_temp")


def unpoolable(sql: bytes | memoryview, tx_status: str) -> str | None:
    """What in `sql` transaction pooling cannot keep for the client, or None.

    A LISTEN inside a transaction block is let through (it takes effect at COMMIT, and a
    rolled-back one leaves nothing); on its own it would stay on a connection others use.
    A temporary table lives until its transaction ends (the session drops the temporary
    objects before the server connection goes back to the pool), so one made on its own,
    outside a transaction block, could never be used: it is refused, unless ON COMMIT DROP
    already says so.
    """
    for match in _UNPOOLABLE.finditer(sql):
        kind = match.lastgroup or ""
        if kind != "listen" or tx_status == "I":
            return _WHAT[kind]
    if tx_status == "I":
        temp = _TEMP_ALONE.match(sql)
        if temp is not None and _ON_COMMIT_DROP.search(temp["rest"]) is None:
            return "a temporary table outside a transaction block"
    return None


def refusal_sql(what: str) -> str:
    """A statement that fails as the refusal of `what`: sent in place of the client's, so the
    error comes in order and aborts an open transaction block as any failed statement does."""
    message = f"{what} cannot be kept under pool_mode=transaction"
    if what.startswith("a temporary table"):
        hint = ("it would be dropped when its transaction ends; create it inside BEGIN ... COMMIT, "
                "or use pool_mode=session")
    else:
        hint = "it would stay on a server connection that other clients use; use pool_mode=session"
    return ("DO $pgmlproxy$BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', "
            f"MESSAGE = '{message}', HINT = '{hint}'; END$pgmlproxy$")


# --- what a server connection owes -------------------------------------------------------


class Tracker(Protocol):
    """Transaction pooling's bookkeeping for one forwarded message (proxy.txstate), settled as
    its response arrives: rows of a swallowed query, its CommandComplete, how it ended."""

    def row(self, body: bytes) -> None: ...
    def complete(self) -> None: ...
    def close(self, t: int) -> None: ...


class Expect:
    """One response owed by the upstream: the message types that end it, and what to do with it.

    Never changed once made, so one plain entry can stand for every simple Query's reply
    (`OWES_READY`).
    """

    __slots__ = ("batch", "plain", "swallow", "sync", "synthetic", "terminals", "track")

    def __init__(
        self, terminals: Reply, batch: int, swallow: Swallow = Swallow.NONE,
        synthetic: bytes | None = None, track: Tracker | None = None, sync: bool = False,
    ) -> None:
        self.terminals = terminals
        self.batch = batch  # the client's extended batch it belongs to (Session.batch)
        self.swallow = swallow
        self.synthetic = synthetic  # the proxy's own answer, sent when it reaches the head
        self.track = track
        # A Sync's ReadyForQuery: where skipping after an error ends. A simple Query's or a
        # FunctionCall's ReadyForQuery is not: sent after the error, before the Sync, the
        # upstream ignores it and never answers it.
        self.sync = sync
        # Relayed as it comes, with nothing to do at its end (Replies.relay's one test).
        self.plain = not swallow and synthetic is None and track is None

    def settle(self, t: int) -> None:
        """The response ended with message type `t` (0: skipped after an error)."""
        if self.track is not None:
            self.track.close(t)


# A simple Query of the client's own, relayed: nothing tracked, and its batch is never read
# (only the entries of an extended batch say which batch an error skips).
OWES_READY = Expect(Reply.READY, -1)


class Copy(enum.Enum):
    """The COPY sub-protocol the server is in (CopyInResponse, CopyOutResponse, CopyBothResponse)."""

    NONE = "none"
    IN = "in"  # the client sends CopyData, then CopyDone or CopyFail
    OUT = "out"
    BOTH = "both"


_COPY_STARTS = {0x47: Copy.IN, 0x48: Copy.OUT, 0x57: Copy.BOTH}
# Messages that need no decision in a response of the client's own that nothing is tracked
# for (errors, ParameterStatus and the start of a COPY do): RowDescription, DataRow,
# CommandComplete, ParameterDescription, NoData, PortalSuspended, EmptyQueryResponse,
# NoticeResponse, NotificationResponse, CopyData, CopyDone.
_PLAIN = frozenset(b"TDCtnsINAdc")
# ... and the ends of owed responses: ParseComplete, BindComplete, CloseComplete, ReadyForQuery.
_RELAYED = _PLAIN | frozenset(b"123Z")


@dataclass(slots=True)
class Fed:
    """What one read of server messages comes to: the bytes for the client (in order, the
    proxy's synthetic answers in their turn), and the events for the session."""

    data: bytes | bytearray
    ready: bool = False  # a ReadyForQuery ended an owed response
    failed: list[int] | None = None  # client batches that got an error (-1: a simple Query's)
    params: list[tuple[str, str]] | None = None  # ParameterStatus, to remember for the client


@dataclass(slots=True)
class Replies:
    """What one server connection owes its client, and the state its replies put it in.

    `expect` queues an owed response as a message goes upstream (a synthetic one with nothing
    ahead of it comes back at once); `feed` takes the upstream's messages as read and says
    what the client gets. After an error in an extended batch the upstream ignores messages up
    to the Sync, so the owed responses before that Sync are dropped (and their bookkeeping
    undone, latest first) as Postgres drops them.
    """

    queue: deque[Expect] = field(default_factory=deque)
    tx_status: str = "I"  # from the last ReadyForQuery: I, T or E
    copy: Copy = Copy.NONE
    said_fatal: bool = False  # a FATAL or PANIC came: the close follows, the client has the reason

    def __len__(self) -> int:
        return len(self.queue)

    def expect(self, entry: Expect) -> bytes | None:
        """Queue `entry`; a synthetic answer with nothing owed before it is the client's now."""
        if entry.synthetic is not None and not self.queue:
            entry.settle(entry.synthetic[0] if entry.synthetic else 0)
            return entry.synthetic
        self.queue.append(entry)
        return None

    def owes_flush(self) -> bool:
        """Whether the upstream holds back a reply until a Flush or Sync (extended messages)."""
        return any(e.terminals is not Reply.READY and e.synthetic is None for e in self.queue)

    def clear(self) -> None:
        self.queue.clear()

    def relay(self, buf: bytes, max_size: int) -> tuple[int, bool] | None:
        """`feed`'s first pass fused with the framing, for one read with nothing buffered before
        it: when every complete message in `buf` is relayed as it came (as `feed`'s common case
        decides), the bytes they span (the client's, as they are) and whether a ReadyForQuery
        ended an owed response. None, with nothing changed: `feed` decides (as does a length
        out of bounds, which the framing refuses). It builds no list of messages and no `Fed`:
        this is every pass-through reply's path."""
        q = self.queue
        for entry in q:
            if not entry.plain:
                return None
        n = len(buf)
        pos = 0
        ends = 0  # owed responses ended here (they leave the queue at the end, together)
        owed = len(q)
        terminals = q[0].terminals if owed else b""  # what ends the next owed response
        status = -1  # the last ReadyForQuery's status byte
        copy_ends = False
        head, relayed = m.HEAD, _RELAYED
        while n - pos >= 5:
            t, length = head(buf, pos)
            if length < 4 or length > max_size:
                return None
            end = pos + 1 + length
            if end > n:
                break
            if t != 0x44:
                if t not in relayed:
                    return None
                if t == 0x43 or t == 0x5A:
                    copy_ends = True  # a COPY ends with its CommandComplete
                if t in terminals:
                    ends += 1
                    if t == 0x5A:
                        status = buf[pos + 5]
                    terminals = q[ends].terminals if ends < owed else b""
            pos = end
        if copy_ends:
            self.copy = Copy.NONE
        if ends == 1:
            q.popleft()
        else:
            for _ in range(ends):
                q.popleft()
        if status < 0:
            return pos, False
        self.tx_status = chr(status)
        return pos, True

    def feed(self, buf: bytes | bytearray, msgs: list[tuple[int, int, int]], used: int) -> Fed:
        """The upstream's messages `msgs` (type, start, end in `buf`, spanning `used` bytes)."""
        q = self.queue
        # The common case: responses of the client's own that nothing is tracked for, and no
        # message that needs a decision. They go on as they came; the owed entries they end
        # leave the queue.
        for t, _, _ in msgs:
            if t not in _RELAYED:
                return self._feed(buf, msgs, used)
        for entry in q:
            if not entry.plain:
                return self._feed(buf, msgs, used)
        ready = False
        for t, s, _ in msgs:
            if t == 0x44:
                continue
            if t == 0x43 or t == 0x5A:
                self.copy = Copy.NONE  # a COPY ends with its CommandComplete
            if q and t in q[0].terminals:
                q.popleft()
                if t == 0x5A:
                    self.tx_status = chr(buf[s + 5])
                    ready = True
        return Fed(buf if used == len(buf) and isinstance(buf, bytes) else buf[:used], ready)

    def _feed(self, buf: bytes | bytearray, msgs: list[tuple[int, int, int]], used: int) -> Fed:
        q = self.queue
        out: list[bytes | bytearray] = []
        fed = Fed(b"")
        span = 0
        for t, s, e in msgs:
            if t == 0x44:  # DataRow: nothing to look at unless the proxy's own rows
                if q and q[0].swallow:
                    if q[0].track is not None:
                        q[0].track.row(bytes(buf[s + 5 : e]))
                    out.append(buf[span:s])
                    span = e
                continue
            relay = True
            if t == 0x45 and _severity(buf, s, e) in ("FATAL", "PANIC"):  # e.g. 57P01: its close follows
                self.said_fatal = True
            elif t in _COPY_STARTS:
                self.copy = _COPY_STARTS[t]
            if q:
                head = q[0]
                if t == 0x43:
                    self.copy = Copy.NONE
                    if head.track is not None:
                        head.track.complete()
                if head.swallow:
                    relay = t == 0x45 and head.swallow is Swallow.OK
                if t == 0x45:
                    self.copy = Copy.NONE
                    if head.terminals is not Reply.READY:
                        (fed.failed or _new(fed)).append(self._skip_to_sync())
                    elif not head.swallow:
                        (fed.failed or _new(fed)).append(-1)  # a simple Query needs no skipping
                elif t in head.terminals:
                    q.popleft().settle(t)
                    if t == 0x5A:
                        self.tx_status = chr(buf[s + 5])
                        self.copy = Copy.NONE
                        fed.ready = True
                    synthetic = self._synthetics()
                    if synthetic:
                        out.append(buf[span:e] if relay else buf[span:s])
                        out.extend(synthetic)
                        span = e
                        continue
            if t == 0x53:
                p = _param(bytes(buf[s + 5 : e]))
                if fed.params is None:
                    fed.params = []
                fed.params.append(p)
            if not relay:
                out.append(buf[span:s])
                span = e
        if not out:  # nothing held back: the bytes go on as they came
            fed.data = buf if used == len(buf) and isinstance(buf, bytes) else buf[:used]
        else:
            out.append(buf[span:used])
            fed.data = b"".join(out)
        return fed

    def _skip_to_sync(self) -> int:
        """After an error in an extended batch the upstream skips to Sync: so do the owed
        entries, a simple Query's or a FunctionCall's sent before the Sync among them."""
        q = self.queue
        batch = q[0].batch
        skipped = []
        while q and not q[0].sync:
            skipped.append(q.popleft())
        for entry in reversed(skipped):  # what failed or never ran is undone, latest first
            entry.settle(0)
        return batch

    def _synthetics(self) -> list[bytes]:
        out = []
        q = self.queue
        while q and q[0].synthetic is not None:
            entry = q.popleft()
            synthetic = entry.synthetic or b""
            entry.settle(synthetic[0] if synthetic else 0)  # sent: as if the server had said it
            out.append(synthetic)
        return out


def _new(fed: Fed) -> list[int]:
    fed.failed = []
    return fed.failed


def _param(body: bytes) -> tuple[str, str]:
    p = m.ParameterStatus.parse(body)
    return p.name, p.value


def _severity(buf: bytes | bytearray, s: int, e: int) -> str:
    """The severity of the ErrorResponse at buf[s:e] (errors are rare: parsing them is cheap);
    the untranslated one (V) where the server sends it, so lc_messages cannot hide a FATAL."""
    fields = m.ErrorResponse.parse(bytes(buf[s + 5 : e])).fields
    return fields.get("V") or fields.get("S", "")
