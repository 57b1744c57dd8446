"""The proxy's HTTP listener (`[http] listen`): the OpenAI-compatible API, the dashboard and /metrics.

`start(config, server)` builds the Starlette app (`proxy.http.app`) and serves it with
uvicorn on the proxy's own event loop, as a task (no second loop, no thread). Routes:
`/v1/models`, `/v1/embeddings`, `/v1/chat/completions`, `/v1/completions`
(`proxy.http.embeddings`, `proxy.http.generation`), `/metrics` (`proxy.metrics.render`) and
`/dashboard/...` (`proxy.http.dashboard` its login and layout; `pages`, `snapshot`, `notebook`).
"""

from proxy.http.server import HttpHandle, start

__all__ = ["HttpHandle", "start"]
