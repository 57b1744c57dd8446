"""A protocol fuzzer against the real proxy in both pool modes (hypothesis).

Each case opens a socket and sends a startup packet (valid, odd or garbage) and, after a
valid one, a sequence of frontend messages: real ones (Query, Parse, Bind, Describe,
Execute, Sync, Flush, Close), with wrong lengths, unknown types, truncated bodies, huge
length fields, bad UTF-8 and Binds whose counts do not match. The answer is read until
the proxy closes or goes quiet; no ErrorResponse may be XX000 (the OIDs used are all real
types, so Postgres itself has no reason for one). After every batch of cases:

- the proxy process is alive and a separate psycopg client is answered within 1 s;
- no server connection is held without a client (admin SHOW POOLS: sv_active <= cl_active);
- the proxy's RSS stays under a bound.

CI runs `PGML_FUZZ_EXAMPLES` cases per mode (default 1000: 2,000 cases, about a minute).
The long run: ``PGML_FUZZ_EXAMPLES=50000 pytest tests/test_fuzz_protocol.py`` (README.md).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from proxy import messages as m
from tests.fix_proxy import ProxyProcess

EXAMPLES = int(os.environ.get("PGML_FUZZ_EXAMPLES", "1000"))
BATCH = max(50, EXAMPLES // 10)
RSS_LIMIT_MIB = 1024
OIDS = (0, 16, 20, 23, 25, 700, 701, 1021, 1009, 3802)
SQL = (
    "SELECT 1",
    "SELECT $1::int",
    "SELECT pgml.predict('no such project', $1::real[])",
    "SELECT pgml.embed('m', $1)",
    "BEGIN",
    "COMMIT",
    "SELECT pg_sleep(0.01)",
    "SELECT 1/0",
    "SELEC",
    "",
)

_I32 = struct.Struct("!i")
texts = st.one_of(st.sampled_from(SQL), st.text(max_size=40))
raw_bytes = st.binary(max_size=64)
bad_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xe2\x28\xa1", b"a\x00b", b"\xed\xa0\x80"])


def _cstr(data: bytes) -> bytes:
    return data.replace(b"\0", b"") + b"\0"


@st.composite
def startup(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(bytes, whether a normal session should follow)."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "params", "garbage", "length", "ssl", "cancel"]))
    if kind == "valid":
        return m.StartupMessage({"user": "postgres", "database": "postgres"}).encode(), True
    if kind == "params":
        params = draw(
            st.dictionaries(
                st.sampled_from(["user", "database", "options", "application_name", "x"]),
                st.text(max_size=12),
                max_size=4,
            )
        )
        body = _I32.pack(196608) + b"".join(_cstr(k.encode()) + _cstr(v.encode()) for k, v in params.items())
        body += draw(st.sampled_from([b"\0", b"", draw(bad_utf8) + b"\0"]))
        return _I32.pack(len(body) + 4) + body, False
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64)), False
    if kind == "length":
        return _I32.pack(draw(st.sampled_from([-1, 0, 3, 8, 10001, 2**31 - 1]))) + draw(raw_bytes), False
    if kind == "ssl":
        return _I32.pack(8) + _I32.pack(80877103), False
    return _I32.pack(16) + _I32.pack(80877102) + draw(st.binary(min_size=8, max_size=8)), False


@st.composite
def message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["Q", "P", "B", "D", "E", "S", "H", "C", "unknown", "length", "cut", "utf8"]))
    if kind == "Q":
        return m.Query(draw(texts)).encode()
    if kind == "P":
        oids = tuple(draw(st.lists(st.sampled_from(OIDS), max_size=3)))
        return m.Parse(draw(st.sampled_from(["", "s1"])), draw(texts), oids).encode()
    if kind == "B":
        n = draw(st.integers(0, 3))
        fmts = tuple(draw(st.lists(st.sampled_from([0, 1, 2, -1]), max_size=3)))
        params = tuple(draw(st.one_of(st.none(), raw_bytes, bad_utf8)) for _ in range(n))
        rfmts = tuple(draw(st.lists(st.sampled_from([0, 1, 7]), max_size=2)))
        return m.Bind(
            draw(st.sampled_from(["", "p1"])), draw(st.sampled_from(["", "s1"])), fmts, params, rfmts
        ).encode()
    if kind == "D":
        return m.frame(b"D", draw(st.sampled_from([b"S", b"P", b"X"])) + _cstr(draw(raw_bytes)))
    if kind == "E":
        return m.Execute(draw(st.sampled_from(["", "p1"])), draw(st.integers(0, 3))).encode()
    if kind in ("S", "H"):
        return m.frame(kind.encode(), draw(st.sampled_from([b"", b"", b"x"])))
    if kind == "C":
        return m.frame(b"C", draw(st.sampled_from([b"S", b"P", b"Z"])) + _cstr(draw(raw_bytes)))
    if kind == "unknown":
        return m.frame(draw(st.sampled_from([b"x", b"\0", b"!", b"z", b"Y"])), draw(raw_bytes))
    if kind == "length":
        return (
            draw(st.sampled_from([b"Q", b"P", b"B"]))
            + _I32.pack(draw(st.sampled_from([-5, 0, 3, 2**30, 2**31 - 1])))
            + draw(raw_bytes)
        )
    if kind == "cut":
        whole = m.Parse("", draw(texts), (23,)).encode()
        return b"P" + _I32.pack(len(whole) - 1) + whole[5 : 5 + draw(st.integers(0, len(whole) - 6))]
    return m.frame(b"Q", draw(bad_utf8) + b"\0")


cases = st.tuples(startup(), st.lists(message(), max_size=6), st.booleans())


def _errors(data: bytes) -> list[dict[str, str]]:
    """The fields of every ErrorResponse in the answer (framing stops at the first bad length)."""
    out: list[dict[str, str]] = []
    pos = 0
    if data[:1] in (b"S", b"N") and len(data) == 1:
        return out
    while pos + 5 <= len(data):
        kind, length = data[pos : pos + 1], _I32.unpack_from(data, pos + 1)[0]
        if length < 4:
            break
        if kind == b"E":
            body = data[pos + 5 : pos + 1 + length]
            out.append(
                {
                    f[:1].decode(errors="replace"): f[1:].decode(errors="replace")
                    for f in body.split(b"\0")
                    if f
                }
            )
        pos += 1 + length
    return out


def _read(sock: socket.socket, until_z: int, quiet: float) -> bytes:
    """Read until `until_z` ReadyForQuery messages came, the proxy closed, or it went quiet."""
    chunks: list[bytes] = []
    sock.settimeout(quiet)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            break
        if not data:
            break
        chunks.append(data)
        if until_z and _count_z(b"".join(chunks)) >= until_z:
            break
    return b"".join(chunks)


def _count_z(data: bytes) -> int:
    count, pos = 0, 0
    while pos + 5 <= len(data):
        length = _I32.unpack_from(data, pos + 1)[0]
        if length < 4:
            break
        count += data[pos : pos + 1] == b"Z"
        pos += 1 + length
    return count


def _send(px: ProxyProcess, first: bytes, normal: bool, msgs: list[bytes], sync: bool) -> bytes:
    """One case: the startup, then (once the session is ready) the messages; then the client vanishes."""
    with socket.create_connection((px.host, px.port), timeout=2) as sock:
        sock.sendall(first)
        answer = _read(sock, 1 if normal else 0, 0.3 if normal else 0.1)
        if normal and _count_z(answer):
            sock.sendall(b"".join(msgs) + (m.frame(b"S") if sync else b""))
            expected = 1 + sum(x[:1] == b"Q" for x in msgs) + int(sync)
            answer += _read(sock, expected - 1, 0.1)
        # Closed without Terminate, often mid-exchange: the proxy must clean up after the client.
        return answer


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _unowned_servers(px: ProxyProcess) -> list[dict[str, Any]]:
    with psycopg.connect(px.dsn(database="pgml_proxy"), autocommit=True) as admin:
        cur = admin.execute("SHOW POOLS")
        names = [c.name for c in cur.description or []]
        pools = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return [p for p in pools if int(p["sv_active"]) > int(p["cl_active"])]


def healthy(px: ProxyProcess) -> None:
    assert px.proc.poll() is None, f"the proxy exited:\n{px.log()[-3000:]}"
    start = time.monotonic()
    with psycopg.connect(px.dsn(), autocommit=True, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - start < 1.0, "a separate client waited over 1 s"
    deadline = time.monotonic() + 5
    while (held := _unowned_servers(px)) and time.monotonic() < deadline:
        time.sleep(0.2)  # closed fuzz clients are being cleaned up
    assert not held, f"server connections held without a client: {held}"
    assert _rss_mib(px.pid) < RSS_LIMIT_MIB


@pytest.fixture(params=["session", "transaction"])
def fuzz_px(request: pytest.FixtureRequest) -> ProxyProcess:
    px: ProxyProcess = request.getfixturevalue("proxy" if request.param == "session" else "proxy_tx")
    return px


# A bug the fuzzer finds in proxy/frontend.py + proxy/pool.py (owned by the session layer),
# issue 15's first two items: a client that vanishes mid extended-protocol exchange (an
# error and no Sync, or a pending Execute) leaves its server connection "active" with no
# client, in both pool modes, until the proxy restarts.
LEAK = "server connections held without a client"
KNOWN_LEAK = {
    "session": "session pooling: the server connection of a client that vanished mid extended-protocol"
    " exchange stays active with no client (SHOW POOLS sv_active > cl_active; issue 15, leaked connections)",
    "transaction": "transaction pooling: the server connection of a client that vanished mid"
    " extended-protocol exchange is not given back (SHOW POOLS sv_active > cl_active; issue 15, poisoned"
    " connections)",
}


def test_fuzz_frontend(fuzz_px: ProxyProcess) -> None:
    internal: list[str] = []
    healthy(fuzz_px)

    def one(case: tuple[tuple[bytes, bool], list[bytes], bool]) -> None:
        (first, normal), msgs, sync = case
        answer = _send(fuzz_px, first, normal, msgs, sync)
        for err in _errors(answer):
            if err.get("C") == "XX000":
                internal.append(f"{err.get('M')} <- {first[:40]!r} {[x[:40] for x in msgs]}")

    # Batches of cases, each from its own seed; the health checks run between them, outside
    # hypothesis (they judge the proxy's state, not one case).
    for batch in range(max(1, EXAMPLES // BATCH)):
        run = settings(
            max_examples=BATCH, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )(given(cases)(one))
        seed(batch)(run)()
        try:
            healthy(fuzz_px)
        except AssertionError as exc:
            if str(exc).startswith(LEAK):
                pytest.xfail(KNOWN_LEAK[fuzz_px.pool_mode])
            raise
    assert internal == [], "\n".join(internal[:10])
