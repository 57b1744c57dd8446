"""`GET /v1/models` and `POST /v1/embeddings`: OpenAI's shapes over the runtime's `pgml.embed`.

An embeddings request is one `pgml.embed` call (`inputs` form) through `Runtime.call_batch`,
so it goes through the same model cache and the same batcher as SQL callers: an HTTP
request and a SQL statement in flight at once share a batch. The call carries no kwargs, so
both land in one group of that batch; `dimensions` is applied here afterwards (the first
N values, then renormalised to unit length), and is a 400 when larger than the model's size.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.errors import PgError
from core.stop import Stop
from proxy.http.common import api_user, context, read_json, state_of, until_disconnect
from proxy.http.errors import ApiError, bad, from_pg


def model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model", "missing_required_parameter")
    return model


async def list_models(request: Request) -> Response:
    """The models this proxy can serve by name: loaded ones, then configured and built-in aliases."""
    api_user(request)
    runtime = state_of(request).runtime
    from runtime.resolve import builtin_aliases

    now = int(time.time())
    seen: dict[str, int] = {}
    for info in runtime.models_info():
        for name in str(info["name"]).split(", "):
            seen.setdefault(name, int(info.get("loaded_at") or now))
    for name in [*runtime.config.aliases, *builtin_aliases()]:
        seen.setdefault(name, now)
    data = [{"id": name, "object": "model", "created": created, "owned_by": "pgml-proxy"}
            for name, created in seen.items()]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    api_user(request)
    runtime = state_of(request).runtime
    name = request.path_params["model"]
    try:
        await runtime.resolver.aresolve(name)
    except PgError as exc:
        raise from_pg(exc, "model") from None
    return JSONResponse({"id": name, "object": "model", "created": int(time.time()),
                         "owned_by": "pgml-proxy"})


def _inputs(body: dict[str, Any], limit: int) -> list[str]:
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise bad("input must be a string or a non-empty array of strings", "input",
                  "missing_required_parameter" if raw is None else "invalid_value")
    if not all(isinstance(t, str) for t in texts):
        raise bad("input must be text: token arrays are not supported by this server", "input")
    if any(not t for t in texts):
        raise bad("input must not contain empty strings", "input")
    if len(texts) > limit:
        raise bad(f"input has {len(texts)} items; at most {limit} per request (http.max_inputs)", "input")
    return texts


def _dimensions(body: dict[str, Any]) -> int | None:
    dim = body.get("dimensions")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise bad("dimensions must be a positive integer", "dimensions")
    return dim


def _encode(vec: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # what the official clients ask for by default: little-endian float32
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


async def embeddings(request: Request) -> Response:
    user = api_user(request)
    state = state_of(request)
    runtime = state.runtime
    body = await read_json(request)
    model = model_name(body)
    texts = _inputs(body, state.settings.max_inputs)
    dim = _dimensions(body)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad('encoding_format must be "float" or "base64"', "encoding_format")
    stop = Stop()
    call = {"transformer": model, "inputs": texts, "kwargs": {}}
    try:
        work = runtime.call_batch("embed", [call], context(user, stop))
        [rows] = await until_disconnect(request, stop, work)
        tokens = await runtime.count_tokens("embed", model, texts)
    except PgError as exc:
        raise from_pg(exc, "model" if exc.code == "42704" else "input") from None
    matrix = np.asarray([row[0] for row in rows], dtype=np.float32)
    if dim is not None:
        if dim > matrix.shape[1]:
            raise bad(f"dimensions {dim} is larger than the model's {matrix.shape[1]}", "dimensions")
        matrix = matrix[:, :dim]
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(matrix)]
    total = int(sum(tokens))
    return JSONResponse({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": total, "total_tokens": total}})


def guarded(handler: Any) -> Any:
    """Route wrapper: an ApiError (or a stray PgError) becomes its OpenAI-shaped answer."""

    async def route(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            return response
        except ApiError as exc:
            return exc.response()
        except PgError as exc:
            return from_pg(exc).response()

    route.__name__ = handler.__name__
    return route
