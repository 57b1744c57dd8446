"""The proxy's HTTP listener (`[http] listen`): the OpenAI-compatible API and /metrics.

`start(config, server)` builds the Starlette app (`proxy.http.app`) and serves it with
uvicorn on the proxy's own event loop, as a task (no second loop, no thread). Routes:
`/v1/models`, `/v1/embeddings`, `/v1/chat/completions`, `/v1/completions`
(`proxy.http.embeddings`, `proxy.http.generation`) and `/metrics` (`proxy.metrics.render`).
"""

from proxy.http.server import HttpHandle, start

__all__ = ["HttpHandle", "start"]
