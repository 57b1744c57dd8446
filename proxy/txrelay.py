"""Transaction pooling's relay decisions, sans-IO: what goes upstream before and with a client's
message, and what each of those messages owes.

In transaction mode a client's statements run on whichever server connection is free. Before
one does, that connection must carry the client's settings and hold the client's version of
every statement name the statement uses; the client's own message may need a new name (its
protocol-level statements run under shared upstream names) or be refused (what the pool cannot
keep). `TxRelay`, one per client, decides all of this from the client's books (its
`proxy.txstate.ClientTx`, its unnamed statement and what its portals will run) and the server
connection's (`Server`: what it holds, carries and reported). Each decision is a list of
`Out`: an upstream message (None for a synthetic answer of the proxy's own) with the reply it
owes (`proxy.session.Expect`). `proxy.frontend.Frontend` sends them and queues the replies;
the rules that change the books are proxy.txstate's. No sockets, no asyncio:
tests/test_txrelay.py drives it with byte fixtures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from core.errors import DuplicatePreparedStatement, PgError
from proxy import messages as m
from proxy import txstate
from proxy.session import TEMP_WORDS, Expect, Replies, Reply, Swallow, refusal_sql, unpoolable

Out = list[tuple[bytes | None, Expect]]


class Server(Protocol):
    """What TxRelay reads and keeps of a server connection (proxy.backend.ServerConn)."""

    txs: txstate.ServerTx
    unnamed: object  # the Parse of the unnamed statement it holds (None: unknown or none)
    params: dict[str, str]  # what it reported with ParameterStatus
    extra: dict[str, str]  # settings applied that it does not report
    applied: tuple[tuple[str, str], ...] | None  # the client settings it is known to carry
    replies: Replies


# A server connection's `unnamed` when it is known to hold none (None: unknown, or none).
NO_UNNAMED = object()


class UnnamedChange:
    """A Parse (`parse`) or a Close (None) of the client's unnamed statement: the books
    (`TxRelay.unnamed`, the server connection's `unnamed`) change as it is sent, and it is
    settled as its reply arrives. ParseComplete or CloseComplete: it stands. Skipped after an
    error earlier in its batch (0): it never ran, and the books are as they were. Refused (an
    ErrorResponse): none is left, as Postgres drops the old statement before it parses."""

    __slots__ = ("after", "before", "ok", "relay", "srv")

    def __init__(self, relay: TxRelay, srv: Server, parse: bytes | None,
                 scan: tuple[txstate.Stmt, ...] | None = None) -> None:
        self.relay, self.srv = relay, srv
        self.before = (relay.unnamed, relay.unnamed_scan, srv.unnamed)
        self.ok = txstate.PARSE_COMPLETE if parse is not None else txstate.CLOSE_COMPLETE
        relay.unnamed, relay.unnamed_scan = parse, scan
        srv.unnamed = parse if parse is not None else NO_UNNAMED
        self.after = (parse, srv.unnamed)

    def row(self, body: bytes) -> None:
        return None

    def complete(self) -> None:
        return None

    def close(self, t: int) -> None:
        if t == self.ok:
            return
        relay, srv = self.relay, self.srv
        unnamed, scan, held = self.before if t == 0 else (None, None, NO_UNNAMED)
        if relay.unnamed is self.after[0]:  # (not if a later Parse or Close changed it since)
            relay.unnamed, relay.unnamed_scan = unnamed, scan
        if srv.unnamed is self.after[1]:
            srv.unnamed = held


@dataclass
class TxRelay:
    """One transaction-pooled client's relay state and decisions (see the module docstring)."""

    txs: txstate.ClientTx = field(default_factory=txstate.ClientTx)
    unnamed: bytes | None = None  # the client's unnamed statement (its Parse message)
    unnamed_scan: tuple[txstate.Stmt, ...] | None = None  # what its SQL does, where it matters
    portal_scan: dict[str, tuple[txstate.Stmt, ...]] = field(default_factory=dict)  # likewise per portal
    temp_objects: bool = False  # the transaction may have made temporary objects

    # --- settings -----------------------------------------------------------------------------
    def settings(self, srv: Server, want: Mapping[str, str], key: tuple[tuple[str, str], ...],
                 batch: int) -> Out:
        """Make `srv` carry the client's settings (`want`, the reported ones, shared as `key`;
        and what SET left, `txstate.settings`) before anything of the client runs on it."""
        if srv.applied is key and srv.txs.settings == self.txs.settings:
            return []
        srv.applied = key
        changes: dict[str, str | None] = {}
        for k, v in want.items():
            if srv.params.get(k, srv.extra.get(k)) != v:
                changes[k] = v
        for k in list(srv.extra):
            if k not in want:
                changes[k] = None
                del srv.extra[k]
        for k, val in changes.items():
            if k not in srv.params and val is not None:
                srv.extra[k] = val
        # What SET and friends left (the server's account, read before the client last let go);
        # kept apart from `extra`, which a new client's login resets.
        wanted = {k.lower() for k in want}
        for k, val in txstate.settings_changes(self.txs.settings, srv.txs.settings).items():
            if val is not None or k not in wanted:
                changes[k] = val
        srv.txs.settings = dict(self.txs.settings)
        if not changes:
            return []
        srv.unnamed = None  # a simple Query drops the unnamed statement upstream
        return [(m.Query(txstate.settings_sql(changes)).encode(), Expect(Reply.READY, batch, Swallow.ALL))]

    # --- a simple Query -----------------------------------------------------------------------
    def query(self, msg: bytes, srv: Server, batch: int) -> Out:
        """A simple Query: the names it uses put in step first; refused if the pool cannot keep
        what it makes."""
        self.unnamed = srv.unnamed = None  # a simple Query drops the unnamed statement upstream
        what = unpoolable(memoryview(msg)[5:], srv.replies.tx_status)
        if what is not None:
            msg = m.Query(refusal_sql(what)).encode()
        elif TEMP_WORDS.search(msg, 5) is not None:
            self.temp_objects = True
        scan = txstate.scan(m.Query.parse(msg[5:]).sql) if txstate.hint(msg) else None
        out: Out = []
        track = None
        if scan is not None:
            syncs = txstate.sync(self.txs, srv.txs, scan)
            tracks, track = txstate.begin_query(self.txs, srv.txs, syncs, scan)
            for s, tr in zip(syncs, tracks, strict=True):
                # The proxy's own statements: if one fails the client's own says why.
                out.append((m.Query(s.text).encode(), Expect(Reply.READY, batch, Swallow.ALL, track=tr)))
        out.append((msg, Expect(Reply.READY, batch, track=track)))
        return out

    # --- the extended protocol ----------------------------------------------------------------
    def _sync_extended(self, srv: Server, scan: tuple[txstate.Stmt, ...], batch: int, out: Out) -> None:
        """Before a Parse, Bind or Describe: `query`'s sync as extended messages, on the unnamed
        statement (Postgres looks up EXECUTE's statement when it parses or describes one)."""
        for s in txstate.sync(self.txs, srv.txs, scan):
            track = txstate.begin(self.txs, srv.txs, [s], sync_only=True)
            # An error here aborts the client's batch upstream: it is relayed (Swallow.OK).
            out.append((m.Parse("", s.text).encode(), Expect(Reply.PARSE, batch, Swallow.OK)))
            out.append((m.Bind("", "").encode(), Expect(Reply.BIND, batch, Swallow.OK)))
            out.append((m.Execute("").encode(), Expect(Reply.EXECUTE, batch, Swallow.OK, track=track)))
            srv.unnamed = None

    def parse_unnamed(self, msg: bytes, srv: Server, batch: int) -> Out:
        """A Parse of the unnamed statement whose text `session.plain` clears."""
        return [(msg, Expect(Reply.PARSE, batch, track=UnnamedChange(self, srv, msg)))]

    def parse(self, msg: bytes, p: m.Parse, srv: Server, batch: int,
              search_path: str) -> tuple[Out, PgError | None]:
        """A Parse: the unnamed statement as sent, a named one under its shared upstream name
        (answered here when the server holds it already). With a PgError the batch fails with
        it, after what the server was sent first."""
        what = unpoolable(p.sql.encode(), srv.replies.tx_status)
        if what is not None:
            p = m.Parse(p.name, refusal_sql(what), p.param_oids)
            msg = p.encode()
        elif TEMP_WORDS.search(msg, 5) is not None:
            self.temp_objects = True
        scan = txstate.scan(p.sql) if txstate.hint(msg) else None
        out: Out = []
        if scan is not None:
            self._sync_extended(srv, scan, batch, out)
        if p.name == "":
            out.append((msg, Expect(Reply.PARSE, batch, track=UnnamedChange(self, srv, msg, scan))))
            return out, None
        if p.name in self.txs.stmts or p.name in self.txs.sql:  # one namespace, as upstream
            return out, DuplicatePreparedStatement(f'prepared statement "{p.name}" already exists')
        srvname = txstate.server_name(p.sql, p.param_oids, search_path)
        prep = txstate.Prepared(srvname, m.Parse(srvname, p.sql, p.param_oids).encode(), scan,
                            txstate.as_sql(p.name, p.sql, p.param_oids))
        if srvname in srv.txs.prepared:
            out.append((None, Expect(Reply.NOTHING, batch, synthetic=m.PARSE_COMPLETE,
                                     track=txstate.parse(self.txs, None, p.name, prep))))
        else:
            track = txstate.parse(self.txs, srv.txs, p.name, prep)
            out.append((prep.parse, Expect(Reply.PARSE, batch, track=track)))
        return out, None

    def unnamed_again(self, srv: Server, batch: int, out: Out) -> None:
        """Before a Bind or Describe of the unnamed statement (both pool modes): the server gets
        the client's own if it holds another (or none), and none when the client has none (it
        never parsed one upstream, closed it, or its simple Query or a local Parse replaced it),
        so that Postgres answers 26000 as to the client alone, not with what another client or
        the proxy's own requests left."""
        if self.unnamed is not None and srv.unnamed != self.unnamed:
            out.append((self.unnamed, Expect(Reply.PARSE, batch, Swallow.OK)))
            srv.unnamed = self.unnamed
        elif self.unnamed is None and srv.unnamed is not NO_UNNAMED:
            out.append((m.CLOSE_UNNAMED, Expect(Reply.CLOSE, batch, Swallow.OK)))
            srv.unnamed = NO_UNNAMED

    def bind_unnamed(self, msg: bytes, srv: Server, batch: int) -> Out:
        """A Bind of the unnamed statement to the unnamed portal, when nothing is scanned."""
        out: Out = []
        self.unnamed_again(srv, batch, out)
        if self.portal_scan:
            self.portal_scan.pop("", None)
        out.append((msg, Expect(Reply.BIND, batch)))
        return out

    def named(self, t: int, msg: bytes, portal: str, stmt: str, rest: bytes, srv: Server, batch: int) -> Out:
        """A Bind or Describe of statement `stmt` (`rest`: the message after its names), or a
        Close of it: under the upstream name, with what the server must hold first."""
        if t == 0x43 and stmt == "":  # the client's unnamed statement goes, and so does the server's
            return [(msg, Expect(Reply.CLOSE, batch, track=UnnamedChange(self, srv, None)))]
        if t == 0x43:  # Close: answered here; what is prepared upstream stays for the next user
            # In its turn, and undone if the batch fails before it is due.
            return [(None, Expect(Reply.NOTHING, batch, synthetic=m.CLOSE_COMPLETE,
                                  track=txstate.close(self.txs, stmt)))]
        out: Out = []
        prep = self.txs.stmts.get(stmt) if stmt else None
        scan = self.unnamed_scan if stmt == "" else prep.stmts if prep is not None else None
        # First what the server must hold for the names the statement uses (this borrows the
        # unnamed statement upstream: it is parsed again below when the client's is needed).
        if prep is None and stmt:  # a PREPAREd name, or none: this client's version, or none
            self._sync_extended(srv, (txstate.Stmt("execute", stmt),), batch, out)
        if scan is not None:  # a Describe too: Postgres looks up EXECUTE's statement for it
            self._sync_extended(srv, scan, batch, out)
        if stmt == "":
            self.unnamed_again(srv, batch, out)
        elif prep is not None:
            if prep.srvname not in srv.txs.prepared:  # prepared again on this connection
                out.append((prep.parse, Expect(Reply.PARSE, batch, Swallow.OK,
                                               track=txstate.parse(None, srv.txs, "", prep))))
            head = (m.cstr(portal) if t == 0x42 else b"S") + m.cstr(prep.srvname)
            msg = m.frame(bytes([t]), head + rest)
        if t == 0x42:
            if scan is not None:
                self.portal_scan[portal] = scan
            else:
                self.portal_scan.pop(portal, None)
        out.append((msg, Expect(Reply.to(t), batch)))
        return out

    def execute(self, msg: bytes, srv: Server, batch: int) -> Out:
        """An Execute of a portal whose statement changes the books (scanned at Bind)."""
        scan = self.portal_scan.pop(m.Execute.parse(msg[5:]).portal, None)
        track = None if scan is None else txstate.begin(self.txs, srv.txs, scan)
        return [(msg, Expect(Reply.EXECUTE, batch, track=track))]

    # --- the end of a transaction -------------------------------------------------------------
    def before_release(self, batch: int, captured: Callable[[list[bytes]], None]) -> Out:
        """What runs on the server connection before it goes back to the pool, one request at a
        time (each ReadyForQuery asks again): the transaction's temporary objects dropped, then
        the settings a SET may have changed read back (their rows to `captured`). Empty: nothing."""
        if self.temp_objects:  # temporary tables end with their transaction: no one else sees them
            self.temp_objects = False
            return [(m.Query("DISCARD TEMP").encode(), Expect(Reply.READY, batch, Swallow.ALL))]
        if self.txs.dirty:  # a SET may have changed the session: ask the server what stuck
            self.txs.dirty = False
            capture_sql = m.Query(txstate.CAPTURE_SQL).encode()
            return [(capture_sql, Expect(Reply.READY, batch, Swallow.ALL, track=txstate.Capture(captured)))]
        return []
