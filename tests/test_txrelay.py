"""proxy/txrelay.py without sockets: a transaction-pooled client's messages in, what goes
upstream before and with each (and what each owes) out.

The server connections are plain values (`Conn`); each decision is fed the replies Postgres
would give (`answer`), through `proxy.session.Replies`, so the books settle as on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import DuplicatePreparedStatement
from proxy import messages as m
from proxy import txstate
from proxy.session import Replies, Reply, Swallow
from proxy.txrelay import Out, TxRelay

KEY: tuple[tuple[str, str], ...] = (("DateStyle", "ISO, MDY"),)


@dataclass
class Conn:
    """A server connection as TxRelay sees it."""

    txs: txstate.ServerTx = field(default_factory=txstate.ServerTx)
    unnamed: object = None
    params: dict[str, str] = field(default_factory=lambda: {"DateStyle": "ISO, MDY"})
    extra: dict[str, str] = field(default_factory=dict)
    applied: tuple[tuple[str, str], ...] | None = None
    replies: Replies = field(default_factory=Replies)


def sent(out: Out) -> list[bytes]:
    """The messages that go upstream, in order."""
    return [data for data, _ in out if data is not None]


def owed(out: Out) -> list[tuple[Reply, bool, bool]]:
    """(reply, swallowed, synthetic) of each decision."""
    return [(e.terminals, bool(e.swallow), e.synthetic is not None) for _, e in out]


def answer(srv: Conn, out: Out) -> bytes:
    """Queue what `out` owes and feed Postgres's success replies to it; what the client gets."""
    replies = {Reply.PARSE: m.PARSE_COMPLETE, Reply.BIND: m.BIND_COMPLETE,
               Reply.EXECUTE: m.CommandComplete("SELECT 0").encode(),
               Reply.READY: m.CommandComplete("SELECT 0").encode() + m.ReadyForQuery("I").encode(),
               Reply.DESCRIBE: m.NO_DATA}
    client = b""
    for _, expect in out:
        now = srv.replies.expect(expect)
        if now is not None:
            client += now
    for data, expect in out:
        if data is None:
            continue
        wire = replies[expect.terminals]
        msgs, used = m.scan(wire, 1 << 20)
        client += bytes(srv.replies.feed(wire, msgs, used).data)
    return client


def test_settings_follow_the_client_once() -> None:
    relay, srv = TxRelay(), Conn(params={"DateStyle": "German, DMY"})
    out = relay.settings(srv, dict(KEY), KEY, 0)
    assert owed(out) == [(Reply.READY, True, False)]  # the proxy's own: never relayed
    assert b"set_config('DateStyle', 'ISO, MDY', false)" in sent(out)[0]
    assert srv.applied is KEY and srv.unnamed is None
    assert relay.settings(srv, dict(KEY), KEY, 0) == []  # carried: nothing to compare


def test_a_sql_prepare_follows_its_client_to_another_server() -> None:
    relay, a, b = TxRelay(), Conn(), Conn()
    answer(a, relay.query(m.Query("PREPARE q AS select 1").encode(), a, 0))
    out = relay.query(m.Query("EXECUTE q").encode(), b, 1)
    assert [x[5:-1] for x in sent(out)] == [b"PREPARE q AS select 1", b"EXECUTE q"]
    assert owed(out) == [(Reply.READY, True, False), (Reply.READY, False, False)]
    answer(b, out)
    assert b.txs.sql == {"q": "PREPARE q AS select 1"}


def test_a_named_statement_runs_under_its_shared_name() -> None:
    relay, a, b = TxRelay(), Conn(), Conn()
    out, error = relay.parse(m.Parse("s1", "select $1", (23,)).encode(), m.Parse("s1", "select $1", (23,)),
                             a, 0, "public")
    srvname = txstate.server_name("select $1", (23,), "public")
    assert error is None and sent(out) == [m.Parse(srvname, "select $1", (23,)).encode()]
    assert answer(a, out) == m.PARSE_COMPLETE
    # The same name again is Postgres's 42P05, after what was sent first.
    _, error = relay.parse(m.Parse("s1", "select 2").encode(), m.Parse("s1", "select 2"), a, 1, "public")
    assert isinstance(error, DuplicatePreparedStatement)
    # On a server that lacks it, a Bind prepares it again (relayed only if it fails) first.
    bind = m.Bind("", "s1", (0,), (b"7",), (0,)).encode()
    r = m.Reader(bind[5:])
    r.cstr(), r.cstr()
    out = relay.named(0x42, bind, "", "s1", bind[5 + r.pos :], b, 2)
    assert owed(out) == [(Reply.PARSE, True, False), (Reply.BIND, False, False)]
    assert sent(out)[1] == m.Bind("", srvname, (0,), (b"7",), (0,)).encode()
    assert answer(b, out) == m.BIND_COMPLETE  # the proxy's ParseComplete is swallowed
    # A Close is answered here, in its turn; the upstream statement stays for the next client.
    close = relay.named(0x43, m.Close("S", "s1").encode(), "", "s1", b"", b, 3)
    assert owed(close) == [(Reply.NOTHING, False, True)] and not sent(close)
    assert answer(b, close) == m.CLOSE_COMPLETE and "s1" not in relay.txs.stmts
    assert srvname in b.txs.prepared


def test_the_unnamed_statement_is_parsed_again_where_another_is_held() -> None:
    relay, a, b = TxRelay(), Conn(), Conn()
    parse = m.Parse("", "select 1").encode()
    answer(a, relay.parse_unnamed(parse, a, 0))
    b.unnamed = m.Parse("", "select 2").encode()  # another client's, left on b
    out = relay.bind_unnamed(m.Bind("", "").encode(), b, 1)
    assert sent(out) == [parse, m.Bind("", "").encode()] and b.unnamed == parse
    assert owed(out)[0] == (Reply.PARSE, True, False)
    again = relay.bind_unnamed(m.Bind("", "").encode(), b, 2)  # b holds it now: the Bind alone
    assert sent(again) == [m.Bind("", "").encode()] and owed(again) == [(Reply.BIND, False, False)]


def test_what_the_pool_cannot_keep_is_refused_in_order() -> None:
    relay, srv = TxRelay(), Conn()
    out = relay.query(m.Query("create temp table t (a int)").encode(), srv, 0)
    assert b"feature_not_supported" in sent(out)[0] and b"pool_mode=session" in sent(out)[0]
    assert not relay.temp_objects
    relay.query(m.Query("begin; create temp table t (a int)").encode(), srv, 1)
    assert relay.temp_objects  # dropped before the server goes back
    release = relay.before_release(2, lambda rows: None)
    assert sent(release) == [m.Query("DISCARD TEMP").encode()]
    assert owed(release) == [(Reply.READY, True, False)]
    assert relay.before_release(2, lambda rows: None) == []


def test_a_set_is_read_back_before_release() -> None:
    relay, srv = TxRelay(), Conn()
    answer(srv, relay.query(m.Query("set work_mem = '8MB'").encode(), srv, 0))
    assert relay.txs.dirty
    got: list[list[bytes]] = []
    out = relay.before_release(1, got.append)
    assert sent(out) == [m.Query(txstate.CAPTURE_SQL).encode()]
    row = m.DataRow((b"work_mem", b"8MB")).encode()
    srv.replies.expect(out[0][1])
    wire = row + m.CommandComplete("SELECT 1").encode() + m.ReadyForQuery("I").encode()
    msgs, used = m.scan(wire, 1 << 20)
    assert srv.replies.feed(wire, msgs, used).data == b""  # never the client's
    assert got == [[row[5:]]] and not relay.txs.dirty
    assert Swallow.ALL is out[0][1].swallow
