"""The Starlette application: the routes of the HTTP listener (API, dashboard, /metrics)."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from proxy import metrics
from proxy.http import embeddings as emb
from proxy.http import generation as gen
from proxy.http import notebook, pages, snapshot
from proxy.http.common import HttpState, state_of
from proxy.http.dashboard import guarded as dashboard_page

STATIC = Path(__file__).with_name("static")  # package data: the dashboard needs no CDN


async def scrape(request: Request) -> Response:
    body = await metrics.render(state_of(request).server)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def build(state: HttpState) -> Starlette:
    guarded = emb.guarded
    routes = [
        Route("/metrics", scrape),
        Route("/v1/models", guarded(emb.list_models)),
        Route("/v1/models/{model:path}", guarded(emb.get_model)),
        Route("/v1/embeddings", guarded(emb.embeddings), methods=["POST"]),
        Route("/v1/chat/completions", guarded(gen.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(gen.completions), methods=["POST"]),
        Route("/", lambda _: RedirectResponse("/dashboard/projects")),
        Route("/dashboard/", lambda _: RedirectResponse("/dashboard/projects")),
        Mount("/dashboard/static", StaticFiles(directory=STATIC)),
        Route("/dashboard/projects", dashboard_page(pages.projects)),
        Route("/dashboard/models/{model_id:int}", dashboard_page(pages.model)),
        Route("/dashboard/models/{model_id:int}/training", dashboard_page(pages.training)),
        Route("/dashboard/loaded", dashboard_page(pages.loaded)),
        Route("/dashboard/snapshots", dashboard_page(pages.snapshots)),
        Route("/dashboard/snapshots/{snapshot_id:int}", dashboard_page(snapshot.snapshot)),
        Route("/dashboard/notebook", dashboard_page(notebook.notebooks), methods=["GET", "POST"]),
        Route("/dashboard/notebooks/{notebook_id:int}", dashboard_page(notebook.notebook),
              methods=["GET", "POST"]),
        Route("/dashboard/upload", dashboard_page(pages.upload), methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.http = state
    return app
