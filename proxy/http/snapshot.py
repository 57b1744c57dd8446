"""The snapshot page: the snapshot's relation's row count, per-column statistics and histograms.

Everything is computed in SQL through the proxy as the logged-in user (so their privileges on
the relation decide whether they see it), from the relation the snapshot reads: its
materialized copy `pgml.snapshot_<id>` when it has one, else the relation it names. Numeric
columns get count, nulls, min, max, mean, stddev and median, and a histogram of `BINS` equal
widths between min and max (`width_bucket`); text and boolean columns get their distinct count
and a bar per most frequent value, the rest in one "other" bar. NULLs get a bar of their own,
so a histogram's bars always add up to the row count.
"""

from __future__ import annotations

from html import escape
from typing import Any

import psycopg
from psycopg import sql
from starlette.requests import Request
from starlette.responses import Response

from proxy.http.dashboard import connect, page, rows, table
from proxy.http.svgplot import bars
from runtime.tabular.preprocess import kind_of

BINS = 10
TOP_VALUES = 10
_STATS = ["column", "type", "count", "nulls", "distinct", "min", "max", "mean", "stddev", "median"]


def relation_of(snapshot_id: int, relation_name: str, materialized: bool) -> sql.Composable:
    if materialized:
        return sql.Identifier("pgml", f"snapshot_{snapshot_id}")
    return sql.Identifier(*relation_name.split(".", 1))


async def _numeric(conn: psycopg.AsyncConnection[Any], rel: sql.Composable, col: sql.Composable,
                   total: int) -> tuple[list[Any], list[str], list[float]]:
    _, found = await rows(conn, sql.SQL(
        "SELECT count({c}), count(DISTINCT {c}), min({c})::float8, max({c})::float8, avg({c})::float8,"
        " stddev({c})::float8, percentile_cont(0.5) WITHIN GROUP (ORDER BY {c})::float8 FROM {r}"
    ).format(c=col, r=rel))
    count, distinct, low, high, mean, std, median = found[0]
    labels: list[str] = []
    counts: list[float] = []
    if count and low == high:
        labels, counts = [f"{low:.4g}"], [float(count)]
    elif count:
        # width_bucket puts the maximum itself in bucket BINS + 1: it belongs to the last bin.
        _, hist = await rows(conn, sql.SQL(
            "SELECT least(width_bucket({c}::float8, %s, %s, %s), %s), count(*) FROM {r}"
            " WHERE {c} IS NOT NULL GROUP BY 1 ORDER BY 1").format(c=col, r=rel),
            [low, high, BINS, BINS])
        by_bin = dict(hist)
        width = (high - low) / BINS
        labels = [f"{low + i * width:.4g}" for i in range(BINS)]
        counts = [float(by_bin.get(i + 1, 0)) for i in range(BINS)]
    if total - count:
        labels.append("NULL")
        counts.append(float(total - count))
    return [count, total - count, distinct, low, high, mean, std, median], labels, counts


async def _categorical(conn: psycopg.AsyncConnection[Any], rel: sql.Composable, col: sql.Composable,
                       total: int) -> tuple[list[Any], list[str], list[float]]:
    _, found = await rows(conn, sql.SQL("SELECT count({c}), count(DISTINCT {c}) FROM {r}")
                          .format(c=col, r=rel))
    count, distinct = found[0]
    _, top = await rows(conn, sql.SQL(
        "SELECT {c}::text, count(*) FROM {r} GROUP BY 1 ORDER BY 2 DESC, 1 NULLS LAST LIMIT %s"
    ).format(c=col, r=rel), [TOP_VALUES])
    labels = ["NULL" if value is None else str(value) for value, _ in top]
    counts = [float(n) for _, n in top]
    if total - sum(counts):
        labels.append("other")
        counts.append(float(total - sum(counts)))
    return [count, total - count, distinct, None, None, None, None, None], labels, counts


async def snapshot(request: Request) -> Response:
    snapshot_id = int(request.path_params["snapshot_id"])
    async with connect(request) as conn:
        _, found = await rows(conn, "SELECT relation_name, y_column_name, materialized, columns, created_at"
                                    " FROM pgml.snapshots WHERE id = %s", [snapshot_id])
        if not found:
            return page("Snapshot not found", f"<p>No snapshot {snapshot_id}.</p>")
        relation_name, y_names, materialized, columns, created = found[0]
        rel = relation_of(snapshot_id, relation_name, bool(materialized))
        _, counted = await rows(conn, sql.SQL("SELECT count(*) FROM {}").format(rel))
        total = int(counted[0][0])
        stats, charts = [], []
        for spec in columns or []:
            name, pg_type = str(spec["name"]), str(spec.get("pg_type", "text"))
            kind = kind_of(pg_type)
            if kind == "array":
                stats.append([name, pg_type] + [None] * (len(_STATS) - 2))
                continue
            summarize = _numeric if kind == "numeric" else _categorical
            values, labels, counts = await summarize(conn, rel, sql.Identifier(name), total)
            stats.append([name, pg_type, *values])
            charts.append(bars(labels, counts, title=name, y_label="rows", css_class="histogram"))
    target = ", ".join(y_names or []) or "none"
    body = (f'<p>relation <b>{escape(relation_name)}</b>{" (materialized copy)" if materialized else ""} · '
            f'target {escape(target)} · created {escape(str(created))} · '
            f'<span id="row-count">{total}</span> rows</p>'
            "<h2>Columns</h2>" + table(_STATS, stats, "column-stats")
            + '<h2>Histograms</h2><div class="charts">' + "".join(charts) + "</div>")
    return page(f"Snapshot {snapshot_id}", body)
