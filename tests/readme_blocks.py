"""The SQL examples of PostgresML's README, extracted in order, with their documented results.

Used by `tests/test_readme_examples.py`. Each SQL block of the reference README is classified:
a runnable statement list, a psql transcript (`pgml=# SELECT ...` followed by its output, from which
the statement is taken), a result (a table or JSON that documents the block before it), or a fragment
(a piece of a larger statement shown for explanation). A psql result table printed inside a block
is kept by row (a one-value table holding JSON is that block's JSON result). JSON results are kept
to check the *shape* of what the proxy returns: the same nesting, keys and value kinds, with
numbers and text free to differ (the tests run small local models in place of the hub's).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
STATEMENT_START = re.compile(r"^\s*(select|create|with|insert|update|delete|drop)\b", re.I)
TABLE_RULE = re.compile(r"^-+(\+-+)*\s*$")
ROW_COUNT = re.compile(r"^\s*\(\d+ rows?\)\s*$")
README = Path(__file__).resolve().parents[2] / "shared" / "reference" / "postgresml-README.md"


@dataclass
class Example:
    index: int  # the block's position among all fenced blocks of the README
    heading: str  # the nearest heading above it, for test ids and messages
    sql: str
    documented: Any = None  # the JSON result shown right after it, when there is one
    statements: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # the result psql printed in the block, by row


def reference_readme() -> Path | None:
    """The reference README, beside the checkout (../shared) as laid out for the team and CI;
    None in a clone that has nothing beside it (the replay test then skips, saying so)."""
    for candidate in (README, Path.cwd().parent / "shared" / "reference" / "postgresml-README.md"):
        if candidate.is_file():
            return candidate
    return None


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))


def _split_statements(sql: str) -> list[str]:
    """Split on semicolons outside quotes (the README's statements hold no dollar quoting)."""
    out: list[str] = []
    current: list[str] = []
    quote = False
    for ch in sql:
        if ch == "'":
            quote = not quote
        if ch == ";" and not quote:
            stmt = "".join(current).strip()
            if _strip_comments(stmt).strip():
                out.append(stmt + ";")
            current = []
        else:
            current.append(ch)
    tail = "".join(current).strip()
    if _strip_comments(tail).strip():
        out.append(tail)
    return out


def _table(body: str) -> list[list[str]]:
    """The rows of the result table psql printed in a block (header and `---+---` line dropped)."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if i and TABLE_RULE.match(line):
            rows: list[list[str]] = []
            for row in lines[i + 1 :]:
                if not row.strip() or ROW_COUNT.match(row):
                    break
                rows.append([cell.strip() for cell in row.split("|")])
            return rows
    return []


def _documented(lang: str, body: str) -> Any:
    if lang != "json":
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return None  # INFO logs and the like: not a result


def examples(path: Path | None = None) -> list[Example]:
    """Every runnable SQL example of the README, in order, with its documented JSON result if any."""
    source = path or reference_readme()
    if source is None:
        raise FileNotFoundError(f"postgresml-README.md not found (looked for {README})")
    text = source.read_text()
    found: list[Example] = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1), match.group(2)
        index = len(FENCE.findall(text[: match.start()]))
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        heading = headings[-1].strip() if headings else ""
        doc = _documented(lang, body)
        if doc is not None and found and found[-1].documented is None and found[-1].index == index - 1:
            found[-1].documented = doc
            continue
        if lang != "postgresql":
            continue
        if "pgml=#" in body:
            # A psql transcript: the statement runs from the prompt to the first semicolon.
            sql = body.split("pgml=#", 1)[1].split(";", 1)[0] + ";"
        elif STATEMENT_START.match(_strip_comments(body)):
            sql = body
        else:
            continue  # a result table or a fragment of a larger statement
        # Some blocks carry psql's answer after the statement: keep only what is SQL.
        statements = [st for st in _split_statements(sql) if STATEMENT_START.match(_strip_comments(st))]
        example = Example(index, heading, sql.strip(), statements=statements, table=_table(body))
        if len(example.table) == 1 and len(example.table[0]) == 1:
            # A one-value table (`SELECT pgml.transform(...)` and its answer): its JSON is the result.
            with contextlib.suppress(json.JSONDecodeError):
                example.documented = json.loads(example.table[0][0])
        found.append(example)
    return found


def cell_kind(cell: str) -> Any:
    """What one psql cell holds: a number, a JSON value's shape, or text."""
    try:
        float(cell)
        return "number"
    except ValueError:
        pass
    if cell[:1] in ("[", "{"):
        with contextlib.suppress(json.JSONDecodeError):
            return shape(json.loads(cell))
    return "text"


def shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys and nesting kept, scalars reduced to their kind."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        kinds = [shape(item) for item in value]
        # A list's shape is the shape of its elements (their count depends on the model).
        return ["list", kinds[0] if kinds else None]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    return "null"
