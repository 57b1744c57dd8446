"""The Starlette application: routes of the HTTP listener and the state they share."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import metrics
from proxy.http import embeddings as emb
from proxy.http import generation as gen
from proxy.http.common import HttpState, state_of


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
    ]
    app = Starlette(routes=routes)
    app.state.http = state
    return app
