"""Transaction pooling's bookkeeping, sans-IO: named statements and session settings.

In transaction mode a client's statements run on whichever server connection is free,
so the proxy must know, for every server connection (`ServerTx`) and every client
(`ClientTx`), which named statements each holds and which session settings each carries.
This module owns those tables and every rule that changes them; it does no I/O (no
asyncio, no sockets) and builds no wire messages, so it is tested with plain values.

- Protocol-level statements (Parse with a name) run upstream under a name derived from
  their text (`server_name`), shared by every client that prepares the same text; a
  server connection's `prepared` set says which of those it holds (or is being sent).
- SQL-level statements (PREPARE / EXECUTE / DEALLOCATE) keep the client's own name; before
  a statement that names one runs, `sync` says what to DEALLOCATE and PREPARE so that the
  server connection holds exactly the client's version of that name (or none).
- Changes are applied when the request is forwarded (a pipeline's later messages must see
  them) and undone when the statement did not run (`Pending`: confirmed by its
  CommandComplete, undone on an error or when skipped to Sync). DEALLOCATE ALL and DISCARD
  ALL empty the server connection's statements, and the client's own, as on a direct link.
- Session settings (SET, RESET, RESET ALL, DISCARD ALL, set_config): a statement that may
  change one marks the client `dirty`; before its server connection goes back to the pool
  the proxy reads the server's own account (`CAPTURE_SQL`), which already knows what
  SET LOCAL, set_config(..., true), ROLLBACK and savepoints undid; `settings_changes` says
  what to replay onto another server connection before the client's next transaction.
  Settings the server reports with ParameterStatus are not kept here (frontend's `want`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import pglast
from pglast import ast, enums

PREFIX = "pgmlproxy_"

# Only text that may hold one of these statements is parsed (pglast); the rest costs a regex.
_LEAD = r"(?:^|;)\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*"
_HINT = re.compile(_LEAD + r"(?:prepare|execute|deallocate|discard|set|reset)\b|set_config",
                   re.IGNORECASE | re.DOTALL)

# The server's own account of the session settings; rows of (name, setting).
CAPTURE_SQL = "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"


# In a Parse message the SQL follows the statement name's NUL.
_HINT_BYTES = re.compile(_HINT.pattern.replace("(?:^|;)", "(?:^|[;\0])").encode(),
                         re.IGNORECASE | re.DOTALL)


def hint(msg: bytes) -> bool:
    """Whether a Query or Parse message may hold a statement `scan` looks for (no decoding)."""
    return _HINT_BYTES.search(memoryview(msg)[5:]) is not None


def server_name(sql: str, param_oids: tuple[int, ...], search_path: str) -> str:
    """The upstream name of a protocol-level statement: equal texts share one."""
    key = f"{sql}\0{param_oids}\0{search_path}".encode()
    return PREFIX + hashlib.sha1(key, usedforsecurity=False).hexdigest()[:20]


def ident(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Stmt:
    """One top-level statement, as far as this module cares.

    kind: prepare, execute, deallocate (name), deallocate_all, discard_all, set, other.
    """

    kind: str
    name: str = ""
    text: str = ""


OTHER = Stmt("other")


def scan(sql: str) -> tuple[Stmt, ...] | None:
    """The statements of `sql`, one per CommandComplete it will give; None: none of interest."""
    if _HINT.search(sql) is None:
        return None
    try:
        texts = pglast.split(sql, with_parser=True)
        out = tuple(_classify(pglast.parse_sql(text)[0].stmt, text) for text in texts)
    except pglast.parser.ParseError:
        return None  # the server gives the syntax error; nothing changes
    return out if any(s.kind != "other" for s in out) else None


def _classify(node: ast.Node | None, text: str) -> Stmt:
    if isinstance(node, ast.PrepareStmt) and node.name:
        return Stmt("prepare", node.name, text)
    if isinstance(node, ast.ExecuteStmt) and node.name:
        return Stmt("execute", node.name)
    if isinstance(node, ast.DeallocateStmt):
        return Stmt("deallocate", node.name) if node.name else Stmt("deallocate_all")
    if isinstance(node, ast.DiscardStmt) and node.target == enums.DiscardMode.DISCARD_ALL:
        return Stmt("discard_all")
    if isinstance(node, ast.VariableSetStmt) or "set_config" in text.lower():
        return Stmt("set")
    return OTHER


@dataclass(slots=True)
class Prepared:
    """A client's protocol-level statement: its upstream name and Parse, what its SQL does."""

    srvname: str
    parse: bytes
    stmts: tuple[Stmt, ...] | None = None
    as_sql: str | None = None  # the same as SQL PREPARE (for SQL EXECUTE), when one can say it


def as_sql(name: str, sql: str, param_oids: tuple[int, ...]) -> str | None:
    """`PREPARE name AS sql`; None when the Parse gave parameter types (SQL would need names)."""
    return None if any(param_oids) else f"PREPARE {ident(name)} AS {sql}"


@dataclass(slots=True)
class ServerTx:
    """What one server connection holds."""

    prepared: set[str] = field(default_factory=set)  # upstream names, prepared or on the way
    sql: dict[str, str] = field(default_factory=dict)  # SQL-level name -> its PREPARE text
    settings: dict[str, str] = field(default_factory=dict)  # session settings not reported

    def reset(self) -> None:
        """After DISCARD ALL (the session-mode reset) nothing is left."""
        self.prepared.clear()
        self.sql.clear()
        self.settings.clear()


@dataclass(slots=True)
class ClientTx:
    """What one client believes its session holds."""

    stmts: dict[str, Prepared] = field(default_factory=dict)
    sql: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    dirty: bool = False  # settings may have changed since the server's account was read

    def view(self, name: str, kind: str) -> str | None:
        """The PREPARE text the server must hold under `name` for this client's `kind` statement.

        A client's protocol-level statement is visible to SQL EXECUTE, DEALLOCATE and PREPARE
        on a direct connection (psycopg sends `DEALLOCATE _pg3_0` when its cache overflows):
        the same statement under that name (or, where its parameter types cannot be written
        in SQL, a placeholder) lets the server answer as it would.
        """
        if name in self.sql:
            return self.sql[name]
        prep = self.stmts.get(name)
        if prep is None:
            return None
        if prep.as_sql is not None:
            return prep.as_sql
        return None if kind == "execute" else f"PREPARE {ident(name)} AS SELECT NULL"


def sync(client: ClientTx, server: ServerTx, stmts: Iterable[Stmt]) -> list[Stmt]:
    """Statements to run first so that `server` holds the client's version of every name used."""
    out: list[Stmt] = []
    seen: set[str] = set()
    for s in stmts:
        if s.kind not in ("prepare", "execute", "deallocate") or s.name in seen:
            continue
        seen.add(s.name)
        want, have = client.view(s.name, s.kind), server.sql.get(s.name)
        if want == have:
            continue
        if have is not None:
            out.append(Stmt("deallocate", s.name, f"DEALLOCATE {ident(s.name)}"))
        if want is not None:
            out.append(Stmt("prepare", s.name, want))
    return out


Undo = Callable[[], None]
PARSE_COMPLETE, CLOSE_COMPLETE = 0x31, 0x33


class Pending:
    """The optimistic changes of forwarded statements, settled as their responses arrive.

    Each statement has a slot in `undos` (shared by the messages of one client request);
    `complete()` on a message's CommandComplete confirms the next of its `slots`; `close(t)`
    on the last message of the request undoes, latest first, every slot left unconfirmed.
    """

    __slots__ = ("final", "slots", "undos")

    def __init__(self, undos: list[Undo | None], slots: list[int] | None = None, final: bool = True) -> None:
        self.undos = undos
        self.slots = list(range(len(undos))) if slots is None else slots
        self.final = final

    def row(self, body: bytes) -> None:
        return None

    def complete(self) -> None:
        if self.slots:
            self.undos[self.slots.pop(0)] = None

    def close(self, t: int) -> None:
        if self.final:
            for i in reversed(range(len(self.undos))):
                undo, self.undos[i] = self.undos[i], None
                if undo is not None:
                    undo()


class ParseTrack(Pending):
    """A Parse (or a Close answered by the proxy): it took effect only if `ok` arrives in its turn."""

    __slots__ = ("ok",)

    def __init__(self, undos: list[Undo | None], ok: int = PARSE_COMPLETE) -> None:
        super().__init__(undos)
        self.ok = ok

    def close(self, t: int) -> None:
        if t == self.ok:
            self.undos[:] = [None] * len(self.undos)
        super().close(t)


def close(client: ClientTx, name: str) -> ParseTrack:
    """A Close of statement `name`, answered by the proxy (upstream it stays for the next user).

    A Close of a PREPAREd name drops it too; if the batch fails before the CloseComplete is
    due, the statement was never closed.
    """
    undos: list[Undo] = []
    prep = client.stmts.pop(name, None)
    if prep is not None:
        undos.append(lambda: _put_back(client, name, prep))
    else:
        undos.append(_set(client.sql, name, None))
    return ParseTrack([_both(*undos)], ok=CLOSE_COMPLETE)


def parse(client: ClientTx | None, server: ServerTx | None, name: str, prep: Prepared) -> ParseTrack:
    """A Parse of `prep` is on its way to `server` (for `client`'s statement `name`, if given).

    `server` None: the server holds it already, the client is answered ParseComplete in its
    turn (unless its batch fails first).
    """
    undos: list[Undo] = []
    if server is not None:
        server.prepared.add(prep.srvname)
        undos.append(lambda: server.prepared.discard(prep.srvname))
    if client is not None:
        client.stmts[name] = prep
        undos.append(lambda: _forget(client, name, prep))
    return ParseTrack([_both(*undos)])


def _forget(client: ClientTx, name: str, prep: Prepared) -> None:
    if client.stmts.get(name) is prep:  # a failed Parse leaves no statement behind
        del client.stmts[name]


class Capture:
    """The rows of the proxy's own query (CAPTURE_SQL), handed to `done` when it ends."""

    __slots__ = ("done", "rows")

    def __init__(self, done: Callable[[list[bytes]], None]) -> None:
        self.done = done
        self.rows: list[bytes] = []

    def row(self, body: bytes) -> None:
        self.rows.append(body)

    def complete(self) -> None:
        return None

    def close(self, t: int) -> None:
        self.done(self.rows)


def begin(client: ClientTx, server: ServerTx, stmts: Iterable[Stmt], sync_only: bool = False) -> Pending:
    """Apply `stmts` optimistically (as they will be when they run); returns how to settle them.

    `sync_only`: the proxy's own statements from `sync`, which change only the server's table.
    """
    return Pending([_apply(client, server, s, sync_only) for s in stmts])


def begin_query(client: ClientTx, server: ServerTx, syncs: list[Stmt],
                stmts: tuple[Stmt, ...]) -> tuple[list[Pending], Pending]:
    """`begin` for one simple Query per sync statement and then the client's own Query.

    They share one account, undone latest first when the client's Query ends: each Query's
    own ReadyForQuery arrives first to last, which would restore in the wrong order.
    """
    undos: list[Undo | None] = [_apply(client, server, s, True) for s in syncs]
    undos += [_apply(client, server, s, False) for s in stmts]
    n = len(syncs)
    return ([Pending(undos, [i], final=False) for i in range(n)],
            Pending(undos, list(range(n, len(undos)))))


def _restore(d: dict[str, str], name: str, old: str | None, new: str | None) -> None:
    if d.get(name) == new:  # only if nothing later changed it again
        if old is None:
            d.pop(name, None)
        else:
            d[name] = old


def _apply(client: ClientTx, server: ServerTx, s: Stmt, sync_only: bool) -> Undo:
    if s.kind == "prepare":
        return _set(server.sql, s.name, s.text) if sync_only else _both(
            _set(client.sql, s.name, s.text), _set(server.sql, s.name, s.text))
    if s.kind == "deallocate":
        undos = [_set(server.sql, s.name, None)]
        if not sync_only:
            undos.append(_set(client.sql, s.name, None))
            old = client.stmts.pop(s.name, None)
            if old is not None:
                undos.append(lambda: _put_back(client, s.name, old))
        return _both(*undos)
    if s.kind in ("deallocate_all", "discard_all"):
        if s.kind == "discard_all":
            client.dirty = True
        return _drop_all(client, server)
    if s.kind == "set":
        client.dirty = True
    return _nothing


def _put_back(client: ClientTx, name: str, prep: Prepared) -> None:
    client.stmts.setdefault(name, prep)


def _nothing() -> None:
    return None


def _set(d: dict[str, str], name: str, value: str | None) -> Undo:
    old = d.get(name)
    if value is None:
        d.pop(name, None)
    else:
        d[name] = value
    return lambda: _restore(d, name, old, value)


def _both(*undos: Undo) -> Undo:
    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo


def _drop_all(client: ClientTx, server: ServerTx) -> Undo:
    saved = dict(client.stmts), dict(client.sql), dict(server.sql), set(server.prepared)
    client.stmts.clear()
    client.sql.clear()
    server.sql.clear()
    server.prepared.clear()

    def undo() -> None:
        for k, v in saved[0].items():
            client.stmts.setdefault(k, v)
        for k, t in saved[1].items():
            client.sql.setdefault(k, t)
        for k, t in saved[2].items():
            server.sql.setdefault(k, t)
        server.prepared.update(saved[3])
    return undo


def captured(rows: Iterable[tuple[str | None, str | None]], reported: Iterable[str]) -> dict[str, str]:
    """The session settings from CAPTURE_SQL's rows, less those the server reports itself."""
    skip = {name.lower() for name in reported}
    return {k: v or "" for k, v in rows if k is not None and k.lower() not in skip}


def settings_changes(want: Mapping[str, str], have: Mapping[str, str]) -> dict[str, str | None]:
    """What to set (a value) or RESET (None) so that a server holding `have` holds `want`."""
    changes: dict[str, str | None] = {k: None for k in have if k not in want}
    changes.update({k: v for k, v in want.items() if have.get(k) != v})
    return changes


_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def valid_setting_name(name: str) -> bool:
    return bool(_GUC_NAME.match(name))


def settings_sql(changes: Mapping[str, str | None]) -> str:
    """Statements that apply `changes` (None: RESET to the default); names must be valid."""
    sets = [f"pg_catalog.set_config({quote(k)}, {quote(v)}, false)"
            for k, v in changes.items() if v is not None]
    parts = ["SELECT " + ", ".join(sets)] if sets else []
    parts += [f"RESET {k}" for k, v in changes.items() if v is None and valid_setting_name(k)]
    return "; ".join(parts)


def quote(text: str) -> str:
    """A SQL string literal for `text` (E'' form when it holds a backslash)."""
    body = text.replace("'", "''")
    if "\\" in body:
        return "E'" + body.replace("\\", "\\\\") + "'"
    return "'" + body + "'"
