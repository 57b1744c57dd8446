"""Read/write routing, pure: which server, the primary or a replica, may run a statement.

Owns the classification of statement text (no I/O, no sockets, no session state): a
cheap lexical test first (the first keyword; SELECT/WITH/VALUES/TABLE/SHOW with no word
that could make it write), cached by text in a bounded LRU so a prepared or repeated
statement is classified once; pglast only where the lexical test cannot tell; anything
unsure goes to the primary. Also the overrides: a leading comment hint
(`/* pgml_proxy: route=primary */`), the session's `SET pgml_proxy.route` (recognised here,
answered by the proxy) and the route of an open transaction, which its first statement
decided. The pgml functions that write come from `core.functions` (`Function.writes`).

Where the chosen route leads (health, bans, lag, read-your-writes, balancing) is
proxy/replicas.py's; when the route is asked (per transaction, per session) is frontend's.
"""

from __future__ import annotations

import enum
import functools
import re

import pglast
from pglast import ast, visitors

from core.functions import declared

CACHE_SIZE = 4096  # distinct statement texts kept classified


class Dest(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"


ROUTE_SETTING = "pgml_proxy.route"
ROUTE_VALUES = ("primary", "replica", "auto")

# Functions that write or need a primary wherever they appear (a standby refuses them with 25006
# or 55000): sequences, NOTIFY, new transaction ids, large objects, WAL control, slots.
_CORE_WRITERS = frozenset({
    "nextval", "setval", "pg_notify", "txid_current", "pg_current_xact_id", "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn", "pg_switch_wal", "pg_create_restore_point",
    "lo_create", "lo_creat", "lo_import", "lo_unlink", "lo_from_bytea", "lo_put", "lowrite",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_drop_replication_slot", "pg_logical_emit_message",
})


def pgml_writers() -> frozenset[str]:
    """The pgml functions declared as writing the registry or tables (train, deploy, ...)."""
    return frozenset(fn.name for fn in declared() if fn.writes)


_READ_WORDS = frozenset({"select", "with", "values", "table", "show"})
_TX_WORDS = frozenset({"begin", "start"})
# Leading blanks, comments and opening parentheses, skipped before the first keyword.
_LEAD = re.compile(r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/|\()*", re.DOTALL)
_WORD = re.compile(r"[A-Za-z_]+")
_HINT = re.compile(r"\A\s*/\*\s*pgml_proxy\s*:\s*route\s*=\s*(\w+)\s*\*/", re.IGNORECASE)
_SET_ROUTE = re.compile(
    r"\A\s*(?:set\s+(?:session\s+|local\s+)?pgml_proxy\.route\s*(?:=|\bto\b)\s*(?:'(\w*)'|\"(\w*)\"|(\w+))"
    r"|(reset)\s+pgml_proxy\.route)\s*;?\s*\Z",
    re.IGNORECASE,
)
_READ_ONLY = re.compile(r"\bread\s+only\b", re.IGNORECASE)
_READ_WRITE = re.compile(r"\bread\s+write\b", re.IGNORECASE)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9$]*")


@functools.cache
def _suspect_words() -> frozenset[str]:
    return _CORE_WRITERS | pgml_writers() | {"into", "insert", "update", "delete", "merge", "share"}


def _suspect(sql: str) -> bool:
    """Whether a read-looking statement may write (a word that could, or several statements):
    then pglast decides. One pass over the identifiers and a set test: an alternation regex of
    these words costs ten times as much on every statement of the pass-through path."""
    semi = sql.find(";")
    if semi >= 0 and sql[semi:].strip("; \t\r\n"):
        return True
    return not _suspect_words().isdisjoint(map(str.lower, _IDENT.findall(sql)))


def hint(sql: str) -> str | None:
    """The route a leading `/* pgml_proxy: route=... */` comment asks for, or None."""
    match = _HINT.match(sql)
    if match is None or match.group(1).lower() not in ROUTE_VALUES:
        return None
    return match.group(1).lower()


def route_setting(sql: str) -> str | None:
    """For `SET pgml_proxy.route = 'x'` / `RESET pgml_proxy.route` (answered by the proxy, never
    sent upstream): the value as written (`auto` for RESET); None for any other statement.
    The caller refuses values outside ROUTE_VALUES with 22023."""
    if "pgml_proxy" not in sql:
        return None
    match = _SET_ROUTE.match(sql)
    if match is None:
        return None
    if match.group(4):
        return "auto"
    return next(g for g in match.groups()[:3] if g is not None)


def decide(sql: str, setting: str = "auto", transaction: Dest | None = None) -> Dest:
    """Where `sql` runs: a comment hint wins, then the session's setting (not `auto`), then the
    route of the open transaction it belongs to (`transaction`), then `classify`."""
    return route(sql, setting, transaction)[0]


def route(sql: str, setting: str = "auto", transaction: Dest | None = None) -> tuple[Dest, bool]:
    """`decide`'s answer, and whether it was asked for explicitly (a hint or the setting)."""
    if sql[:2] == "/*" or (sql[:1].isspace() and sql.lstrip().startswith("/*")):
        asked = hint(sql)
        if asked is not None and asked != "auto":
            return Dest(asked), True
    if setting != "auto":
        return Dest(setting), True
    if transaction is not None:
        return transaction, False
    return classify(sql), False


@functools.lru_cache(maxsize=CACHE_SIZE)
def classify(sql: str) -> Dest:
    """REPLICA for a statement a read-only standby runs as the primary would; else PRIMARY."""
    lead = _LEAD.match(sql)
    word = _WORD.match(sql, lead.end() if lead else 0)
    if word is None:
        return Dest.PRIMARY  # empty, or something odd: the primary answers it
    first = word.group(0).lower()
    if first in _TX_WORDS and not _suspect(sql):
        # BEGIN / START TRANSACTION: READ ONLY decides the whole transaction.
        ro = _READ_ONLY.search(sql) is not None and _READ_WRITE.search(sql) is None
        return Dest.REPLICA if ro else Dest.PRIMARY
    if first not in _READ_WORDS and first != "explain":
        return Dest.PRIMARY
    if first != "explain" and not _suspect(sql):
        return Dest.REPLICA
    return _parsed(sql)


def _parsed(sql: str) -> Dest:
    """The parser's answer, for what the lexical test could not tell (unparsable: the primary)."""
    try:
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return Dest.PRIMARY
    if not stmts:
        return Dest.PRIMARY
    reads = all(_read_only(raw.stmt) for raw in stmts)
    return Dest.REPLICA if reads else Dest.PRIMARY


def _read_only(node: ast.Node | None) -> bool:
    if isinstance(node, ast.ExplainStmt):
        return _read_only(node.query)  # EXPLAIN ANALYZE runs it; plain EXPLAIN of a write: primary too
    if isinstance(node, ast.VariableShowStmt):
        return True
    if isinstance(node, ast.TransactionStmt):
        return _read_only_tx(node)
    if isinstance(node, ast.SelectStmt):
        finder = _Writes(pgml_writers())
        finder(node)
        return not finder.found
    return False


def _read_only_tx(node: ast.TransactionStmt) -> bool:
    from pglast.enums import TransactionStmtKind as Kind

    if node.kind in (Kind.TRANS_STMT_BEGIN, Kind.TRANS_STMT_START):
        for opt in node.options or ():
            if isinstance(opt, ast.DefElem) and opt.defname == "transaction_read_only":
                arg = opt.arg
                return isinstance(arg, ast.A_Const) and getattr(arg.val, "ival", 0) == 1
        return False
    return node.kind in (Kind.TRANS_STMT_COMMIT, Kind.TRANS_STMT_ROLLBACK)


class _Writes(visitors.Visitor):  # type: ignore[misc]
    """Finds anything in a SELECT that writes: INTO, FOR UPDATE/SHARE, a data-modifying CTE, a
    call of a writing function (a pgml one by its name, schema-qualified or not)."""

    def __init__(self, pgml: frozenset[str]) -> None:
        self.pgml = pgml
        self.found = False

    def visit_SelectStmt(self, ancestors: object, node: ast.SelectStmt) -> None:
        if node.intoClause is not None or node.lockingClause:
            self.found = True

    def visit_InsertStmt(self, ancestors: object, node: ast.Node) -> None:
        self.found = True

    visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = visit_InsertStmt

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        names = [getattr(n, "sval", "") for n in node.funcname or ()]
        name = names[-1].lower() if names else ""
        schema = names[0].lower() if len(names) > 1 else ""
        if name in _CORE_WRITERS or (name in self.pgml and schema in ("", "pgml")):
            self.found = True
