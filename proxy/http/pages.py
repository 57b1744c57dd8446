"""The dashboard's pages: projects, a model, its training curves, loaded models, the snapshots
list and the CSV upload (a snapshot's page is `proxy.http.snapshot`, the notebook
`proxy.http.notebook`). Each runs its queries through the proxy as the logged-in
user (`proxy.http.dashboard.connect`); the loaded models come from the runtime itself.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from html import escape
from typing import Any

from psycopg import sql
from starlette.requests import Request
from starlette.responses import Response

from proxy.http.common import state_of
from proxy.http.dashboard import connect, link, page, rows, table
from proxy.http.svgplot import bars, plot

_DONE = ("successful", "failed", "cancelled", "deployed")
# Which metric stands for a model in the projects list, by task.
_KEY_METRIC = {"classification": "f1", "regression": "r2"}
_CURVES = ("loss", "eval_loss", "learning_rate", "grad_norm")


async def projects(request: Request) -> Response:
    async with connect(request) as conn:
        _, data = await rows(conn, """
            SELECT p.name, p.task, m.id, m.algorithm, m.status, m.metrics, m.id = d.model_id
            FROM pgml.projects p
            LEFT JOIN pgml.models m ON m.project_id = p.id
            LEFT JOIN LATERAL (SELECT model_id FROM pgml.deployments WHERE project_id = p.id
                               ORDER BY created_at DESC, id DESC LIMIT 1) d ON true
            ORDER BY p.name, m.id""")
    by_project: dict[str, list[tuple[Any, ...]]] = {}
    for row in data:
        by_project.setdefault(row[0], []).append(row)
    parts = []
    for name, models in by_project.items():
        task = models[0][1]
        key = _KEY_METRIC.get(task, "")
        listed = [(link(f"/dashboard/models/{mid}", mid), algo, status, (metrics or {}).get(key),
                   "deployed" if deployed else "") for _, _, mid, algo, status, metrics, deployed in models
                  if mid is not None]
        parts.append(f'<section class="project" data-name="{escape(name)}"><h2 class="project-name">'
                     f"{escape(name)}</h2><p>task: {escape(task)}</p>"
                     + table(["model", "algorithm", "status", key or "metric", "deployment"], listed,
                             "models")
                     + "</section>")
    return page("Projects", "".join(parts) or "<p>No projects yet: run pgml.train.</p>")


async def model(request: Request) -> Response:
    model_id = int(request.path_params["model_id"])
    async with connect(request) as conn:
        _, found = await rows(conn, """
            SELECT p.name, p.task, m.algorithm, m.status, m.hyperparams, m.metrics, m.search,
                   m.search_params, m.snapshot_id, m.created_at
            FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id WHERE m.id = %s""", [model_id])
        if not found:
            return page("Model not found", f"<p>No model {model_id}.</p>")
        _, deployments = await rows(conn, "SELECT id, strategy, created_at FROM pgml.deployments "
                                          "WHERE model_id = %s ORDER BY id", [model_id])
    project, task, algorithm, status, hyper, metrics, search, search_params, snapshot, created = found[0]
    metrics = dict(metrics or {})
    results = metrics.pop("search_results", None)
    importances = metrics.pop("feature_importances", None)
    body = [f"<p>project {link('/dashboard/projects', project)} · task {escape(task)} · "
            f"algorithm <b>{escape(algorithm)}</b> · status {escape(status)} · snapshot {snapshot} · "
            f"created {escape(str(created))} · "
            f"{link(f'/dashboard/models/{model_id}/training', 'training')}</p>",
            "<h2>Metrics</h2>", table(["metric", "value"], sorted(metrics.items()), "metrics"),
            "<h2>Hyperparameters</h2>",
            table(["hyperparameter", "value"], sorted((k, json.dumps(v)) for k, v in (hyper or {}).items()),
                  "hyperparams")]
    if importances:  # largest first: jsonb keeps no key order
        ranked = sorted(importances.items(), key=lambda kv: -kv[1])
        body += ["<h2>Feature importances</h2>",
                 bars(*zip(*ranked, strict=True), title="feature importances",
                      y_label="importance", css_class="importances")]
    if results:
        body.append(f"<h2>Search ({escape(str(search))})</h2>")
        scores = results["mean_test_score"]
        for param in (search_params or {}):
            xs = [p.get(param) for p in results["params"]]
            body.append(plot(xs, scores, title=f"score vs {param}", x_label=param, y_label="mean test score"))
    body += ["<h2>Deployments</h2>", table(["deployment", "strategy", "at"], deployments, "deployments")]
    return page(f"Model {model_id}", "".join(body))


async def training(request: Request) -> Response:
    """Live curves of a model's pgml.logs (a running pgml.tune writes them); refreshes until done."""
    model_id = int(request.path_params["model_id"])
    async with connect(request) as conn:
        _, status = await rows(conn, "SELECT status FROM pgml.models WHERE id = %s", [model_id])
        _, logs = await rows(conn, "SELECT logs FROM pgml.logs WHERE model_id = %s ORDER BY id", [model_id])
    entries = [e for (e,) in logs if isinstance(e, dict)]
    state = str(status[0][0]) if status else "unknown"
    body = [f"<p>{len(entries)} log entries · status {escape(state)}</p>"]
    for key in _CURVES:
        points = [(e.get("step", i), e[key]) for i, e in enumerate(entries)
                  if isinstance(e.get(key), int | float)]
        if points:
            body.append(plot([p[0] for p in points], [float(p[1]) for p in points], title=key, x_label="step",
                             y_label=key, line=True, css_class="curve"))
    running = bool(status) and status[0][0] not in _DONE
    return page(f"Training of model {model_id}", "".join(body), refresh=3 if running else 0)


async def loaded(request: Request) -> Response:
    """What the runtime holds now (no SQL: the proxy's own state, for a logged-in user)."""
    async with connect(request):
        pass  # the login check
    runtime = state_of(request).server.runtime
    info = runtime.models_info() if runtime is not None else []
    names = ["name", "kind", "engine", "device", "precision", "memory_bytes", "load_seconds", "batches",
             "items", "queued"]
    return page("Loaded models", table(names, [[m.get(n) for n in names] for m in info], "loaded"))


async def snapshots(request: Request) -> Response:
    async with connect(request) as conn:
        names, data = await rows(conn, """
            SELECT id, relation_name, y_column_name, test_size, test_sampling, status, materialized,
                   analysis::text, created_at FROM pgml.snapshots ORDER BY id""")
    listed = [(link(f"/dashboard/snapshots/{row[0]}", row[0]), *row[1:]) for row in data]
    return page("Snapshots", table(names, listed, "snapshots"))


_UPLOAD = ('<form method="post" enctype="multipart/form-data"><p>table <input name="table" id="table"></p>'
           '<p><input type="file" name="file" id="file" accept=".csv"></p>'
           '<p><button type="submit" id="upload">Upload</button></p></form>')


def _parse_csv(raw: bytes) -> tuple[list[str], list[str], list[list[str | None]]]:
    """Header, a type per column (bigint, double precision or text, by what every value parses as)."""
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
    header = next(reader)
    data = [[v if v != "" else None for v in row] for row in reader if row]
    types = []
    for i in range(len(header)):
        values = [v for row in data if i < len(row) and (v := row[i]) is not None]
        types.append("bigint" if values and all(_is(int, v) for v in values) else
                     "double precision" if values and all(_is(float, v) for v in values) else "text")
    return header, types, data


def _is(kind: type, value: str) -> bool:
    try:
        kind(value)
        return True
    except ValueError:
        return False


async def upload(request: Request) -> Response:
    """A CSV into a new table through COPY, as the logged-in user (who then owns the table)."""
    if request.method != "POST":
        async with connect(request):
            pass
        return page("Upload data", _UPLOAD)
    form = await request.form()
    name, file = str(form.get("table") or ""), form.get("file")
    if not name or file is None or isinstance(file, str):
        return page("Upload data", '<p class="error">a table name and a CSV file are needed</p>' + _UPLOAD)
    header, types, data = await asyncio.to_thread(_parse_csv, await file.read())
    columns = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(h), sql.SQL(t))
                                 for h, t in zip(header, types, strict=True))
    target = sql.Identifier(*name.split(".", 1))
    async with connect(request) as conn:
        try:
            async with conn.transaction():
                await conn.execute(sql.SQL("CREATE TABLE {} ({})").format(target, columns))
                copy_in = sql.SQL("COPY {} FROM STDIN").format(target)
                async with conn.cursor() as cur, cur.copy(copy_in) as copy:
                    for row in data:
                        await copy.write_row(row)
        except Exception as exc:
            return page("Upload data", f'<p class="error">{escape(str(exc))}</p>' + _UPLOAD)
    return page("Upload data", f'<p id="uploaded">{len(data)} rows into {escape(name)}</p>' + _UPLOAD)
