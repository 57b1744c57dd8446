"""The SQL notebook: notebooks and their cells saved in the upstream, results as tables and charts.

Notebooks live in `pgml.notebooks` / `pgml.notebook_cells` (migration 0007, the upstream
dashboard's tables). A cell's SQL runs through the proxy as the logged-in user, so `pgml.*`
works and Postgres's privileges apply; the cell is saved with its result and run time, and the
page redirects to itself (a reload shows the saved cells and runs nothing again). The result is
saved in `rendering` as JSON (column names and rows), not HTML as upstream does: the table is
writable by every role, so what it holds is escaped when shown, never trusted as markup. Numeric
result columns are drawn against the first column (or the row number) with `svgplot.plot`.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from decimal import Decimal
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from proxy.http.dashboard import connect, link, page, rows, table
from proxy.http.svgplot import plot

SQL_CELL = 3  # upstream's cell_type of an SQL cell
MAX_ROWS = 1000  # rows saved and shown per cell
_NEW = ('<form method="post"><p>new notebook <input name="name" id="notebook-name"> '
        '<button type="submit" id="create">Create</button></p></form>')
_CELL = ('<form method="post"><textarea name="sql" rows="6"></textarea>'
         '<p><button type="submit" id="run">Run</button></p></form>')


async def notebooks(request: Request) -> Response:
    """The list of notebooks; a POST creates one and goes to it."""
    async with connect(request) as conn:
        if request.method == "POST":
            name = str((await request.form()).get("name") or "").strip() or "untitled"
            _, made = await rows(conn, "INSERT INTO pgml.notebooks (name) VALUES (%s) RETURNING id", [name])
            return RedirectResponse(f"/dashboard/notebooks/{made[0][0]}", 303)
        _, found = await rows(conn, "SELECT n.id, n.name, count(c.id), n.updated_at FROM pgml.notebooks n"
                                    " LEFT JOIN pgml.notebook_cells c ON c.notebook_id = n.id AND"
                                    " c.deleted_at IS NULL GROUP BY n.id ORDER BY n.id")
    listed = [(link(f"/dashboard/notebooks/{i}", name), cells, at) for i, name, cells, at in found]
    return page("SQL notebooks", table(["notebook", "cells", "updated"], listed, "notebooks") + _NEW)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value).lower()
    if isinstance(value, int | float):
        return value
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


async def _run(conn: Any, text: str) -> dict[str, Any]:
    try:
        names, data = await rows(conn, text)
    except Exception as exc:  # the statement's error is the cell's output
        return {"error": str(exc)}
    return {"columns": names, "rows": [[_jsonable(v) for v in row] for row in data[:MAX_ROWS]],
            "total": len(data)}


async def notebook(request: Request) -> Response:
    """A notebook's saved cells; a POST runs a new SQL cell, saves it and shows the notebook again."""
    notebook_id = int(request.path_params["notebook_id"])
    async with connect(request) as conn:
        _, found = await rows(conn, "SELECT name FROM pgml.notebooks WHERE id = %s", [notebook_id])
        if not found:
            return page("Notebook not found", f"<p>No notebook {notebook_id}.</p>")
        if request.method == "POST":
            text = str((await request.form()).get("sql") or "")
            start = time.perf_counter()
            result = await _run(conn, text)
            took = timedelta(seconds=time.perf_counter() - start)
            await rows(conn, "INSERT INTO pgml.notebook_cells (notebook_id, cell_type, cell_number, version,"
                             " contents, rendering, execution_time) SELECT %s, %s,"
                             " coalesce(max(cell_number), 0) + 1, 1, %s, %s, %s FROM pgml.notebook_cells"
                             " WHERE notebook_id = %s",
                       [notebook_id, SQL_CELL, text, json.dumps(result), took, notebook_id])
            await rows(conn, "UPDATE pgml.notebooks SET updated_at = now() WHERE id = %s", [notebook_id])
            return RedirectResponse(f"/dashboard/notebooks/{notebook_id}", 303)
        _, cells = await rows(conn, "SELECT cell_number, cell_type, contents, rendering, execution_time"
                                    " FROM pgml.notebook_cells WHERE notebook_id = %s AND deleted_at IS NULL"
                                    " ORDER BY cell_number, version DESC", [notebook_id])
    shown = "".join(_cell(*c) for c in cells)
    return page(f"Notebook: {found[0][0]}", shown + _CELL)


def _cell(number: int, kind: int, contents: str, rendering: str | None, took: Any) -> str:
    head = f'<section class="cell" data-cell="{number}"><pre class="sql">{escape(contents)}</pre>'
    if kind != SQL_CELL:  # a Markdown cell of an upstream notebook: shown as its text
        return head + "</section>"
    try:
        result = json.loads(rendering or "{}")
    except ValueError:
        result = {}
    if "error" in result:
        out = f'<p class="error">{escape(str(result["error"]))}</p>'
    elif result.get("columns"):
        names, data = result["columns"], result.get("rows", [])
        total = int(result.get("total", len(data)))
        cut = f"<p>first {len(data)} of {total} rows</p>" if total > len(data) else ""
        out = table(names, data, "result") + cut + charts(names, data)
    else:
        out = "<p>OK</p>"
    return head + out + f'<p class="took">{escape(str(took))}</p></section>'


def _numeric(data: list[list[Any]], i: int) -> bool:
    values = [row[i] for row in data if row[i] is not None]
    return bool(values) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def charts(names: list[str], data: list[list[Any]]) -> str:
    """A plot per numeric column: against the first column, or the row number when the first
    column is the only numeric one."""
    numeric = [i for i in range(len(names)) if _numeric(data, i)]
    if not numeric:
        return ""
    x_index = 0 if numeric != [0] else None
    x_label = names[0] if x_index is not None else "row"
    parts = []
    for i in numeric:
        if i == x_index:
            continue
        points = [(row[x_index] if x_index is not None else n + 1, row[i])
                  for n, row in enumerate(data) if row[i] is not None
                  and (x_index is None or row[x_index] is not None)]
        parts.append(plot([p[0] for p in points], [float(p[1]) for p in points], title=names[i],
                          x_label=x_label, y_label=names[i], line=True, css_class="plot chart"))
    return '<div class="charts">' + "".join(parts) + "</div>"
