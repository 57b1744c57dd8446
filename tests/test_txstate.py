"""proxy/txstate.py without sockets: what SQL text does to named statements and settings,
what a server connection must run to be in step with a client, and how optimistic changes
are confirmed (CommandComplete, ParseComplete) or undone (an error, a skip to Sync).
"""

from __future__ import annotations

from proxy import messages as m
from proxy import txstate as txs
from proxy.txstate import ClientTx, Prepared, ServerTx, Stmt


def test_scan_reads_only_what_changes_names_or_settings() -> None:
    assert txs.scan("select 1") is None
    assert txs.scan("update t set a = 1") is None  # SET as a clause, not a statement
    assert txs.scan("select set_byte('x', 0, 1)") is None
    assert txs.scan("DEALLOCATE ALL") == (Stmt("deallocate_all"),)
    assert txs.scan("deallocate prepare foo") == (Stmt("deallocate", "foo"),)
    assert txs.scan("discard all") == (Stmt("discard_all"),)
    assert txs.scan("discard plans") is None
    assert txs.scan('EXECUTE "Foo"(1)') == (Stmt("execute", "Foo"),)
    assert txs.scan("select 1; PREPARE q AS select 2;  -- c\n SET LOCAL work_mem = '9MB'") == (
        txs.OTHER, Stmt("prepare", "q", "PREPARE q AS select 2"), Stmt("set"))
    assert txs.scan("/* x */ RESET ALL") == (Stmt("set"),)
    assert txs.scan("select pg_catalog.set_config('a.b', '1', false)") == (Stmt("set"),)
    assert txs.scan("PREPARE broken AS selec 1") is None  # the server says what is wrong


def test_hint_finds_statements_in_query_and_parse_bytes() -> None:
    assert txs.hint(m.Query("  prepare a as select 1").encode())
    assert txs.hint(m.Parse("_pg3_0", "DEALLOCATE ALL").encode())
    assert not txs.hint(m.Query("select 'execute me'").encode())
    # A prefilter: it may say yes to a statement *named* set; `scan` then finds nothing.
    assert txs.scan("select 1") is None


def test_server_names_are_shared_by_equal_texts() -> None:
    a = txs.server_name("select $1", (23,), "public")
    assert a == txs.server_name("select $1", (23,), "public")
    assert a.startswith(txs.PREFIX) and len(a) == len(txs.PREFIX) + 20
    assert a != txs.server_name("select $1", (25,), "public")
    assert a != txs.server_name("select $1", (23,), "other")


def test_sync_gives_the_server_the_clients_version_or_none() -> None:
    client, server = ClientTx(), ServerTx()
    server.sql["q"] = "PREPARE q AS select 'someone else'"
    # The client never prepared q: the other client's q must go before EXECUTE q runs.
    assert txs.sync(client, server, [Stmt("execute", "q")]) == [Stmt("deallocate", "q", 'DEALLOCATE "q"')]
    client.sql["q"] = "PREPARE q AS select 'mine'"
    assert txs.sync(client, server, [Stmt("execute", "q"), Stmt("deallocate", "q")]) == [
        Stmt("deallocate", "q", 'DEALLOCATE "q"'), Stmt("prepare", "q", "PREPARE q AS select 'mine'")]
    server.sql["q"] = client.sql["q"]
    assert txs.sync(client, server, [Stmt("execute", "q")]) == []


def test_protocol_statements_are_visible_to_sql() -> None:
    """psycopg evicts with `DEALLOCATE _pg3_0`; SQL EXECUTE may run a protocol statement."""
    client, server = ClientTx(), ServerTx()
    plain = Prepared("pgmlproxy_x", b"", None, txs.as_sql("_pg3_0", "select $1", ()))
    typed = Prepared("pgmlproxy_y", b"", None, txs.as_sql("_pg3_1", "select $1", (23,)))
    client.stmts.update({"_pg3_0": plain, "_pg3_1": typed})
    assert txs.sync(client, server, [Stmt("execute", "_pg3_0")]) == [
        Stmt("prepare", "_pg3_0", 'PREPARE "_pg3_0" AS select $1')]
    assert txs.sync(client, server, [Stmt("execute", "_pg3_1")]) == []  # its types: not in SQL
    assert txs.sync(client, server, [Stmt("deallocate", "_pg3_1")]) == [
        Stmt("prepare", "_pg3_1", 'PREPARE "_pg3_1" AS SELECT NULL')]
    done = txs.begin(client, server, [Stmt("deallocate", "_pg3_1")])
    done.complete()
    done.close(0x5A)
    assert "_pg3_1" not in client.stmts and "_pg3_0" in client.stmts


def test_a_statement_that_did_not_run_is_undone() -> None:
    client, server = ClientTx(), ServerTx()
    pending = txs.begin(client, server, txs.scan("PREPARE a AS select 1; PREPARE b AS select 2") or ())
    assert set(client.sql) == set(server.sql) == {"a", "b"}  # a pipeline's next message sees them
    pending.complete()  # a's CommandComplete; then b fails
    pending.close(0x5A)
    assert set(client.sql) == set(server.sql) == {"a"}


def test_deallocate_all_empties_both_and_a_failed_one_restores_them() -> None:
    client, server = ClientTx(), ServerTx()
    client.stmts["s"] = Prepared("pgmlproxy_s", b"")
    client.sql["q"] = server.sql["q"] = "PREPARE q AS select 1"
    server.prepared.add("pgmlproxy_s")
    failed = txs.begin(client, server, [Stmt("deallocate_all")])
    assert not (client.stmts or client.sql or server.sql or server.prepared)
    failed.close(0x5A)  # no CommandComplete: it did not run (an aborted transaction)
    assert set(client.stmts) == {"s"} and set(server.sql) == {"q"} and server.prepared == {"pgmlproxy_s"}
    ok = txs.begin(client, server, [Stmt("discard_all")])
    ok.complete()
    ok.close(0x5A)
    assert not (client.stmts or server.prepared) and client.dirty


def test_undo_runs_latest_first_across_the_messages_of_one_query() -> None:
    """The sync's DEALLOCATE q and the client's PREPARE q both fail (an aborted transaction).

    Each has its own ReadyForQuery, first to last; undone in that order the server's table
    would lose the other client's q while the server still holds it.
    """
    client, server = ClientTx(), ServerTx()
    theirs = "PREPARE q AS select 'theirs'"
    server.sql["q"] = theirs
    stmts = (Stmt("prepare", "q", "PREPARE q AS select 'theirs'"),)
    syncs = txs.sync(client, server, stmts)
    tracks, mine = txs.begin_query(client, server, syncs, stmts)
    for track in tracks:
        track.close(0x5A)
    mine.close(0x5A)
    assert server.sql == {"q": theirs} and client.sql == {}


def test_a_parse_is_prepared_only_when_its_parse_complete_arrives() -> None:
    client, server = ClientTx(), ServerTx()
    prep = Prepared("pgmlproxy_p", b"")
    ok = txs.parse(client, server, "s", prep)
    assert "pgmlproxy_p" in server.prepared and client.stmts["s"] is prep
    ok.close(txs.PARSE_COMPLETE)
    assert "pgmlproxy_p" in server.prepared and "s" in client.stmts
    server2 = ServerTx()
    skipped = txs.parse(None, server2, "", prep)  # a re-prepare for another server
    skipped.close(0)
    assert not server2.prepared and client.stmts["s"] is prep
    answered = txs.parse(client, None, "t", prep)  # the server had it: a ParseComplete of ours
    answered.close(0)  # its batch failed before it was due
    assert "t" not in client.stmts and "pgmlproxy_p" in server.prepared


def test_settings_are_read_back_and_replayed_as_a_difference() -> None:
    rows = [("work_mem", "5120"), ("DateStyle", "ISO, MDY"), ("enable_seqscan", "off")]
    got = txs.captured(rows, reported=["DateStyle", "TimeZone"])
    assert got == {"work_mem": "5120", "enable_seqscan": "off"}
    assert txs.settings_changes(got, {"work_mem": "4096", "geqo": "off"}) == {
        "geqo": None, "work_mem": "5120", "enable_seqscan": "off"}
    assert txs.settings_changes(got, dict(got)) == {}
    capture = txs.Capture(lambda bodies: seen.extend(bodies))
    seen: list[bytes] = []
    capture.row(b"r1")
    capture.close(0x5A)
    assert seen == [b"r1"]


def test_set_marks_the_client_for_a_read_back() -> None:
    client, server = ClientTx(), ServerTx()
    txs.begin(client, server, txs.scan("SET LOCAL work_mem = '9MB'") or ()).close(0x5A)
    assert client.dirty


def test_a_close_answered_here_is_undone_when_its_batch_fails_first() -> None:
    """Pipeline: Bind/Execute fails, then Close s: Postgres skips the Close, so s remains."""
    client = ClientTx()
    prep = Prepared("pgmlproxy_s", b"")
    client.stmts["s"] = prep
    txs.close(client, "s").close(0)  # skipped to Sync
    assert client.stmts["s"] is prep
    client.sql["q"] = "PREPARE q AS select 1"
    done = txs.close(client, "q")
    done.close(txs.CLOSE_COMPLETE)
    assert "q" not in client.sql
