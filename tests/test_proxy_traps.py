"""Every item of the protocol-traps list (where proxies broke real drivers), through the real proxy.

Where a driver hides the behaviour (Flush without Sync, portal suspension, skip to
Sync, GSSENCRequest), a small raw-socket client built on proxy/messages.py speaks the
protocol byte by byte; elsewhere real drivers do.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from proxy import messages as m
from tests.fix_proxy import ProxyProcess


class Raw:
    """A bare v3 client: send framed messages, read (type, body) pairs."""

    def __init__(self, px: ProxyProcess, prelude: bytes = b"", user: str = "postgres",
                 database: str = "postgres", **params: str) -> None:
        self.sock = socket.create_connection((px.host, px.port), timeout=10)
        self.framer = m.Framer()
        self.prelude_answer = b""
        if prelude:
            self.sock.sendall(prelude)
            self.prelude_answer = self.sock.recv(1)
        self.sock.sendall(m.StartupMessage({"user": user, "database": database, **params}).encode())
        self.startup = self.until(b"Z")

    def send(self, *msgs: bytes) -> None:
        self.sock.sendall(b"".join(msgs))

    def read(self) -> tuple[bytes, bytes]:
        while True:
            msgs, _used = self.framer.scan()
            if msgs:
                t, s, e = msgs[0]
                body = bytes(self.framer.buf[s + 5 : e])
                self.framer.drop(e)
                return bytes([t]), body
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.framer.feed(data)

    def until(self, kind: bytes, count: int = 1) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the `count`-th of type `kind`."""
        out = []
        while count:
            msg = self.read()
            out.append(msg)
            if msg[0] == kind:
                count -= 1
        return out

    def close(self) -> None:
        self.sock.close()


def kinds(msgs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(t for t, _ in msgs)


@pytest.fixture(params=["session", "transaction"])
def px(request: pytest.FixtureRequest) -> ProxyProcess:
    proxy: ProxyProcess = request.getfixturevalue("proxy" if request.param == "session" else "proxy_tx")
    return proxy


def test_parameter_status_drivers_need(px: ProxyProcess) -> None:
    raw = Raw(px)
    statuses = [m.ParameterStatus.parse(b) for t, b in raw.startup if t == b"S"]
    params = {p.name: p.value for p in statuses}
    for name in ("server_version", "integer_datetimes", "client_encoding", "DateStyle",
                 "standard_conforming_strings", "TimeZone"):
        assert name in params, name
    assert kinds(raw.startup).startswith(b"R") and b"K" in kinds(raw.startup)
    raw.close()


def test_gssenc_and_ssl_requests_get_n(px: ProxyProcess) -> None:
    gss = struct.pack("!ii", 8, m.GSSENC_REQUEST)
    raw = Raw(px, prelude=gss)
    assert raw.prelude_answer == b"N" and kinds(raw.startup).endswith(b"Z")
    raw.close()
    with psycopg.connect(px.dsn(), sslmode="prefer", gssencmode="prefer") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.ssl_in_use is False


def test_error_skips_to_sync_and_ready_only_on_sync(px: ProxyProcess) -> None:
    raw = Raw(px)
    raw.send(m.Parse("", "SELECT 1/g FROM generate_series(0, 0) g").encode(), m.Bind("", "").encode(),
             m.Execute("").encode(), m.Parse("", "SELECT 1").encode(), m.Bind("", "").encode(),
             m.Execute("").encode(), m.SYNC)
    got = raw.until(b"Z")
    assert kinds(got) == b"12EZ"
    assert m.ErrorResponse.parse(got[2][1]).fields["C"] == "22012"
    raw.send(m.Parse("", "SELECT 2").encode(), m.Bind("", "").encode(), m.Execute("").encode(), m.SYNC)
    got = raw.until(b"Z")
    assert kinds(got) == b"12DCZ" and m.DataRow.parse(got[2][1]).values == (b"2",)
    raw.close()


def _error_then_query_before_sync(raw: Raw, pipelined: bool) -> list[bytes]:
    # Split: the error read first (Flush), then the Query, then Sync, so the proxy knows it
    # skips by the time the Query comes. Pipelined: all in one write, so the Query has gone
    # upstream, owing a reply, before the error comes back.
    failing = [m.Parse("", "SELECT 1/g FROM generate_series(0, 0) g").encode(), m.Bind("", "").encode(),
               m.Execute("").encode()]
    out = []
    if pipelined:
        call = m.frame(b"F", struct.pack("!IhhH", 1598, 0, 0, 0))  # FunctionCall of random()
        raw.send(*failing, m.Query("SELECT 5").encode(), call, m.SYNC)
    else:
        raw.send(*failing, m.FLUSH)
        out.append(kinds(raw.until(b"E")))
        raw.send(m.Query("SELECT 5").encode())
        time.sleep(0.2)
        raw.send(m.SYNC)
    out.append(kinds(raw.until(b"Z")))
    raw.send(m.Query("SELECT 6").encode())
    second = raw.until(b"Z")
    assert m.DataRow.parse(second[1][1]).values == (b"6",)
    return [*out, kinds(second)]


@pytest.mark.parametrize("pipelined", [False, True], ids=["split", "pipelined"])
def test_simple_query_after_an_extended_error_is_skipped_until_sync(
    proxy_factory: Callable[..., ProxyProcess], pg_server: Any, pipelined: bool
) -> None:
    """Postgres ignores every message up to Sync after an error in the extended protocol, a
    simple Query and a FunctionCall among them (they get no reply at all): the proxy relays the
    same replies and owes nothing after, so in transaction pooling the server connection goes
    back to the pool, whether the Query was sent after the error was read or with the batch."""
    target = type("Direct", (), {"host": "127.0.0.1", "port": pg_server.port})()
    want = _error_then_query_before_sync(Raw(target), pipelined)  # type: ignore[arg-type]
    assert want == ([b"12EZ"] if pipelined else [b"12E", b"Z"]) + [b"TDCZ"]  # no reply to the Query
    for mode in ("session", "transaction"):
        px = proxy_factory(mode)
        raw = Raw(px)
        assert _error_then_query_before_sync(raw, pipelined) == want
        if mode == "transaction":
            time.sleep(0.2)
            with psycopg.connect(px.dsn(database="pgml_proxy"), autocommit=True) as admin:
                linked = [r for r in admin.execute("SHOW SERVERS").fetchall() if r[5]]
            assert linked == [], linked  # nothing owed: released, although the client stays
        raw.close()
        px.stop()


def _batches_back_to_back(raw: Raw) -> list[bytes]:
    """Whole extended batches, each with its Sync and in its own write, sent without waiting
    for the replies (as a pipelining driver does): the first fails, the rest run. Each kind of
    message is read with its payload, so the rows are compared too."""
    batch = [m.Describe("P", "").encode(), m.Execute("").encode(), m.SYNC]
    raw.send(m.Parse("", "SELECT 1/g FROM generate_series(0, 0) g").encode(), m.Bind("", "").encode(), *batch)
    plus_one = m.Parse("", "SELECT $1::int + 1", (23,)).encode()
    raw.send(plus_one, m.Bind("", "", (0,), (b"41",)).encode(), *batch)
    raw.send(m.Bind("", "", (0,), (b"1",)).encode(), *batch)  # the unnamed statement again
    raw.send(m.Parse("", "SELECT 1/0").encode(), m.Bind("", "").encode(), *batch)
    raw.send(m.Query("SELECT 7").encode())
    out = []
    for _ in range(5):
        for t, body in raw.until(b"Z"):
            out.append(t + (body if t in (b"D", b"Z") else m.ErrorResponse.parse(body).fields["C"].encode()
                            if t == b"E" else b""))
    return out


def test_whole_batches_back_to_back_after_an_error_match_postgres(px: ProxyProcess, pg_server: Any) -> None:
    """Extended batches relayed whole (`Frontend._relay_batch`) owe shared entries with no
    batch of their own: an error in one must not make the proxy skip any of the next."""
    target = type("Direct", (), {"host": "127.0.0.1", "port": pg_server.port})()
    direct = Raw(target)  # type: ignore[arg-type]
    want = _batches_back_to_back(direct)
    direct.close()
    assert [w[:1] for w in want] == [b"1", b"2", b"T", b"E", b"Z", b"1", b"2", b"T", b"D", b"C", b"Z",
                                      b"2", b"T", b"D", b"C", b"Z", b"1", b"E", b"Z",  # 1/0 fails at Bind
                                      b"T", b"D", b"C", b"Z"], want
    raw = Raw(px)
    for _ in range(3):  # again on the same connection: nothing left over from the errors
        assert _batches_back_to_back(raw) == want
    raw.close()


def _unnamed_statement_life(first: Raw, second: Raw, pgml: bool) -> list[bytes]:
    """The unnamed statement as two clients see it: `first` parses one and binds it again
    after a pgml statement of its own in the extended protocol (the proxy's requests use the
    unnamed statement upstream), after the other client's turn, and after a simple Query
    (which drops it: 26000), parses it again, closes it and binds it (26000); `second`, which
    never parsed one, binds and describes it (26000, not `first`'s statement)."""
    out: list[bytes] = []

    def run(raw: Raw, *msgs: bytes) -> None:
        raw.send(*msgs, *([] if msgs[0][:1] == b"Q" else [m.SYNC]))
        got = raw.until(b"Z")
        code = {t: m.ErrorResponse.parse(body).fields["C"].encode() for t, body in got if t == b"E"}
        out.append(b" ".join(t + code.get(t, body if t == b"D" else b"") for t, body in got))

    parse, bind_exec = m.Parse("", "SELECT 42").encode(), (m.Bind("", "").encode(), m.Execute("").encode())
    run(first, parse, *bind_exec)
    run(first, *bind_exec)
    if pgml:  # not on a direct connection: its answer is the proxy's alone
        first.send(m.Parse("p", "SELECT pgml.version() IS NOT NULL").encode(), m.Bind("", "p").encode(),
                   m.Execute("").encode(), m.SYNC)
        assert kinds(first.until(b"Z")) == b"12DCZ"
    run(first, *bind_exec)
    run(second, *bind_exec)
    run(second, m.Describe("S", "").encode())
    run(first, *bind_exec)
    run(first, m.Query("SELECT 1").encode())
    run(first, *bind_exec)
    run(first, parse, *bind_exec)
    run(first, m.Close("S", "").encode())
    run(first, *bind_exec)
    return out


def test_the_unnamed_statement_is_each_clients_own(
    proxy_factory: Callable[..., ProxyProcess], pg_server: Any
) -> None:
    """A Bind or Describe of the unnamed statement finds what this client left there, as on a
    direct connection: its own statement although the proxy's requests or another client used
    the server's meanwhile, and none (26000) once closed, dropped by a simple Query, or never
    parsed."""
    target = type("Direct", (), {"host": "127.0.0.1", "port": pg_server.port})()
    direct = [Raw(target), Raw(target)]  # type: ignore[arg-type]
    want = _unnamed_statement_life(direct[0], direct[1], pgml=False)
    for raw in direct:
        raw.close()
    assert sum(b"E26000" in r for r in want) == 4 and want[1] == b"2 D\x00\x01\x00\x00\x00\x0242 C Z", want
    for mode in ("session", "transaction"):
        px = proxy_factory(mode, pool_size=2 if mode == "session" else 1)  # transaction: one server for both
        clients = [Raw(px), Raw(px)]
        assert _unnamed_statement_life(clients[0], clients[1], pgml=True) == want, mode
        for raw in clients:
            raw.close()
        px.stop()


def _malformed_names(raw: Raw) -> list[bytes]:
    """Bind, Describe, Close, Parse and Execute whose fields end before their message does, each
    then Sync: Postgres answers an ERROR (08P01), skips to the Sync and goes on."""
    out = []
    for msg in (m.frame(b"B", b"x"), m.frame(b"B", b"\0"), m.frame(b"D"), m.frame(b"D", b"S"),
                m.frame(b"C", b"S"), m.frame(b"C", b"Sx"), m.frame(b"P", b"\0SELECT 1"),
                m.frame(b"P", b"\0SELECT 1\0"), m.frame(b"E", b"x"), m.frame(b"E", b"\0\0")):
        raw.send(msg, m.SYNC)
        got = raw.until(b"Z")
        fields = [m.ErrorResponse.parse(body).fields for t, body in got if t == b"E"]
        out.append(b" ".join(t for t, _ in got) + b"".join(f"{f['S']} {f['C']}".encode() for f in fields))
    return out


def test_malformed_names_of_extended_messages_get_what_postgres_says(
    proxy_factory: Callable[..., ProxyProcess], pg_server: Any
) -> None:
    target = type("Direct", (), {"host": "127.0.0.1", "port": pg_server.port})()
    direct = Raw(target)  # type: ignore[arg-type]
    want = _malformed_names(direct)
    direct.close()
    assert all(r == b"E ZERROR 08P01" for r in want), want
    for mode in ("session", "transaction"):
        px = proxy_factory(mode)
        raw = Raw(px)
        assert _malformed_names(raw) == want, mode
        raw.send(m.Query("SELECT 1").encode())
        assert kinds(raw.until(b"Z")) == b"TDCZ"  # the connection goes on
        raw.close()
        px.stop()


def test_flush_without_sync_is_honoured(px: ProxyProcess) -> None:
    raw = Raw(px)
    raw.send(m.Parse("", "SELECT $1::int").encode(), m.Describe("S", "").encode(), m.FLUSH)
    got = [raw.read() for _ in range(3)]  # answered although no Sync was sent
    assert kinds(got) == b"1tT"
    assert m.ParameterDescription.parse(got[1][1]).oids == (23,)
    raw.send(m.SYNC)
    assert kinds(raw.until(b"Z")) == b"Z"
    raw.close()


def test_describe_statement_parameter_description_first(px: ProxyProcess) -> None:
    raw = Raw(px)
    raw.send(m.Parse("s_desc", "SELECT $1::text, $2::int8").encode(), m.Describe("S", "s_desc").encode(),
             m.SYNC)
    got = raw.until(b"Z")
    assert kinds(got) == b"1tTZ"
    cols = m.RowDescription.parse(got[2][1]).columns
    assert [c.type_oid for c in cols] == [25, 20]
    raw.send(m.Describe("S", "no_such").encode(), m.SYNC)
    got = raw.until(b"Z")
    assert m.ErrorResponse.parse(got[0][1]).fields["C"] == "26000"
    raw.close()


def test_portal_suspension_returns_all_rows(px: ProxyProcess) -> None:
    raw = Raw(px)
    raw.send(m.Query("BEGIN").encode())
    raw.until(b"Z")
    raw.send(m.Parse("", "SELECT generate_series(1, 5)").encode(), m.Bind("cur", "").encode(),
             m.Execute("cur", 2).encode(), m.Execute("cur", 2).encode(), m.Execute("cur", 2).encode(), m.SYNC)
    got = raw.until(b"Z")
    assert kinds(got) == b"12DDsDDsDCZ"
    rows = [m.DataRow.parse(b).values[0] for t, b in got if t == b"D"]
    assert rows == [b"1", b"2", b"3", b"4", b"5"]
    assert m.ReadyForQuery.parse(got[-1][1]).status == "T"
    raw.send(m.Query("COMMIT").encode())
    assert kinds(raw.until(b"Z"))[-2:] == b"CZ"
    raw.close()


def test_copy_in_extended_protocol_with_sync(px: ProxyProcess) -> None:
    raw = Raw(px)
    table = f"xc_{px.port}"  # not TEMP: in transaction mode the next statement may use another conn
    raw.send(m.Query(f"CREATE TABLE IF NOT EXISTS {table} (a int); TRUNCATE {table}").encode())
    raw.until(b"Z")
    raw.send(m.Parse("", f"COPY {table} FROM STDIN").encode(), m.Bind("", "").encode(),
             m.Execute("").encode(),
             m.FLUSH)
    assert kinds([raw.read() for _ in range(3)]) == b"12G"
    raw.send(m.copy_data(b"1\n2\n3\n"), m.COPY_DONE, m.SYNC)
    got = raw.until(b"Z")
    assert kinds(got) == b"CZ" and m.CommandComplete.parse(got[0][1]).tag == "COPY 3"
    raw.send(m.Query(f"SELECT sum(a) FROM {table}").encode())
    assert [m.DataRow.parse(b).values for t, b in raw.until(b"Z") if t == b"D"] == [(b"6",)]
    raw.send(m.Query(f"DROP TABLE {table}").encode())
    raw.until(b"Z")
    raw.close()


def test_startup_options_and_settings_survive(px: ProxyProcess) -> None:
    opts = r"-c search_path=pg_catalog,public -c statement_timeout=4321 --DateStyle=SQL,\ DMY"
    with psycopg.connect(px.dsn(), options=opts, application_name="trapper", autocommit=True) as conn:
        for _ in range(3):  # several transactions: in transaction mode each may use another server conn
            assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog,public",)
            assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
            assert conn.execute("SHOW DateStyle").fetchone() == ("SQL, DMY",)
            assert conn.execute("SHOW application_name").fetchone() == ("trapper",)
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        with psycopg.connect(px.dsn(), autocommit=True) as other:  # takes turns with the first
            assert other.execute("SHOW statement_timeout").fetchone() == ("0",)
            assert other.execute("SHOW TimeZone").fetchone() != ("Asia/Tokyo",)
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)


def test_negotiate_protocol_version_for_unknown_options(px: ProxyProcess) -> None:
    raw = Raw(px, b"", **{"_pq_.made_up": "1"})
    neg = [m.NegotiateProtocolVersion.parse(b) for t, b in raw.startup if t == b"v"]
    assert neg == [m.NegotiateProtocolVersion(0, ("_pq_.made_up",))]
    raw.send(m.Query("SELECT 1").encode())
    assert b"D" in kinds(raw.until(b"Z"))
    raw.close()


def test_cancel_reaches_only_its_own_client(proxy_factory: Callable[..., ProxyProcess]) -> None:
    """With one server connection shared, a cancel from an idle client must not hit the busy one."""
    px = proxy_factory("transaction", pool_size=1)
    with psycopg.connect(px.dsn(), autocommit=True) as idle, \
            psycopg.connect(px.dsn(), autocommit=True) as busy:
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(busy.execute("SELECT pg_sleep(1.0), 'ok'")
                                                             .fetchone()))
        worker.start()
        time.sleep(0.3)
        idle.cancel_safe()  # a stale key: that client has no query running
        worker.join(10)
        assert done == [("", "ok")]
        assert idle.execute("SELECT 'fine'").fetchone() == ("fine",)


def test_protocol_violations_get_08p01_and_others_go_on(px: ProxyProcess) -> None:
    raw = Raw(px)
    raw.send(b"!\x00\x00\x00\x04")  # no such message type
    t, body = raw.read()
    assert t == b"E" and m.ErrorResponse.parse(body).fields["C"] == "08P01"
    raw.close()
    raw = Raw(px)
    raw.send(b"Q\x7f\x00\x00\x00")  # declares ~2 GB
    t, body = raw.read()
    fields = m.ErrorResponse.parse(body).fields
    assert t == b"E" and fields["C"] == "08P01" and "limit" in fields["M"]
    raw.close()
    with psycopg.connect(px.dsn()) as conn:
        assert conn.execute("SELECT 'others fine'").fetchone() == ("others fine",)


def test_bad_startup_errors(px: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(px.dsn(database="no_such_db_xyz"))
    sock = socket.create_connection((px.host, px.port), timeout=10)
    sock.sendall(m.StartupMessage({"database": "postgres"}).encode())
    data = sock.recv(4096)
    assert data[:1] == b"E" and m.ErrorResponse.parse(data[5:]).fields["C"] == "28000"
    sock.close()
    sock = socket.create_connection((px.host, px.port), timeout=10)
    sock.sendall(struct.pack("!ii", 8, 2 << 16))  # protocol 2.0
    data = sock.recv(4096)
    assert data[:1] == b"E" and m.ErrorResponse.parse(data[5:]).fields["C"] == "0A000"
    sock.close()


def test_pgml_portal_suspension_matches_postgres(px: ProxyProcess, pg_server: Any) -> None:
    """A row-limited pgml portal in a transaction: the messages and the final tag Postgres gives
    a plain portal of the same shape (the tag counts the last Execute's rows), from a cursor."""

    def run(target: Any, sql: str) -> list[tuple[bytes, bytes]]:
        raw = Raw(target)
        raw.send(m.Query("BEGIN").encode())
        raw.until(b"Z")
        raw.send(m.Parse("", sql).encode(), m.Bind("cur", "").encode(), m.Execute("cur", 2).encode(),
                 m.Execute("cur", 2).encode(), m.Execute("cur", 2).encode(), m.SYNC)
        # The first pgml.embed of the proxy loads MiniLM: on a busy 2-core machine that alone can
        # pass the 10 s socket timeout, and this test is about the messages, not the time.
        raw.sock.settimeout(120)
        got = raw.until(b"Z")
        raw.send(m.Query("SELECT count(*) FROM pg_cursors WHERE name LIKE 'pgml_portal_%'").encode())
        [(_, open_cursors)] = [(t, b) for t, b in raw.until(b"Z") if t == b"D"]
        assert m.DataRow.parse(open_cursors).values[0] == b"0"  # closed once exhausted
        raw.close()
        return got

    direct = run(type("Direct", (), {"host": "127.0.0.1", "port": pg_server.port})(),
                 "SELECT 'x' || g FROM generate_series(1, 5) g")
    proxied = run(px, "SELECT pgml.embed('all-MiniLM-L6-v2', 'x' || g) FROM generate_series(1, 5) g")
    assert kinds(direct) == kinds(proxied) == b"12DDsDDsDCZ"
    tags = [[b for t, b in got if t == b"C"] for got in (direct, proxied)]
    assert tags[0] == tags[1] == [b"SELECT 1\x00"]
    vectors = [m.DataRow.parse(b).values[0] for t, b in proxied if t == b"D"]
    assert len(vectors) == 5 and all(v is not None and v.count(b",") == 383 for v in vectors)


def test_a_completed_pgml_portal_executed_again_matches_postgres(px: ProxyProcess, pg_server: Any) -> None:
    """Execute of a portal already run to the end: a statement with rows gives none and
    `SELECT 0`; one without rows cannot run again (55000, naming the portal). The proxy sent an
    empty tag before."""

    def run(target: Any, setup: str, sql: str) -> list[tuple[bytes, bytes]]:
        raw = Raw(target)
        raw.sock.settimeout(120)  # the first pgml.embed loads MiniLM
        raw.send(m.Query(setup).encode())
        raw.until(b"Z")
        raw.send(m.Parse("", sql).encode(), m.Bind("", "").encode(), m.Execute("").encode(),
                 m.Execute("").encode(), m.SYNC)
        got = raw.until(b"Z")
        raw.close()
        return got

    def shape(got: list[tuple[bytes, bytes]]) -> list[tuple[bytes, str]]:
        out = []
        for t, body in got:
            if t == b"C":
                out.append((t, m.CommandComplete.parse(body).tag))
            elif t == b"E":
                fields = m.ErrorResponse.parse(body).fields
                out.append((t, f"{fields['C']} {fields['M']}"))
            elif t != b"D":
                out.append((t, ""))
        return out

    direct = type("Direct", (), {"host": "127.0.0.1", "port": pg_server.port})()
    table = "CREATE TABLE IF NOT EXISTS again_t (v text)"
    assert shape(run(direct, table, "SELECT 'x'")) == shape(run(
        px, table, "SELECT pgml.embed('all-MiniLM-L6-v2', 'x')::text IS NOT NULL")) == [
        (b"1", ""), (b"2", ""), (b"C", "SELECT 1"), (b"C", "SELECT 0"), (b"Z", "")]
    without_rows = [(b"1", ""), (b"2", ""), (b"C", "INSERT 0 1"),
                    (b"E", '55000 portal "" cannot be run'), (b"Z", "")]
    assert shape(run(direct, table, "INSERT INTO again_t VALUES ('x')")) == without_rows
    assert shape(run(px, table, "INSERT INTO again_t VALUES (pgml.embed('all-MiniLM-L6-v2', 'x')::text)")) \
        == without_rows


def test_messages_split_into_single_bytes(px: ProxyProcess) -> None:
    """A Query and an extended batch arriving a byte at a time (a slow link, a fuzzer): answered
    as whole ones. The one-step relays must not read a message that has not all arrived."""
    raw = Raw(px)
    raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    batch = (m.Parse("", "select $1::int + 1").encode() + m.Bind("", "", (0,), (b"41",), (0,)).encode()
             + m.Describe("P", "").encode() + m.Execute("").encode() + m.SYNC)
    for data, want in ((m.Query("select 41 + 1").encode(), b"TDCZ"), (batch, b"12TDCZ")):
        for i in range(len(data)):
            raw.sock.sendall(data[i : i + 1])
            time.sleep(0.001)
        got = raw.until(b"Z")
        assert kinds(got) == want
        assert [m.DataRow.parse(b).values[0] for t, b in got if t == b"D"] == [b"42"]
    raw.close()
