"""The planner: finds `pgml.*` calls in SQL and runs them in batches (see DESIGN.md).

`build_handler` is the proxy's one entry point; `analyze` is the pure SQL-in, plan-out part.
Both load on first use: the runtime imports only `core.interfaces` (the contracts), and
must not pull in pglast and psycopg with it (the GPU check runs the runtime without them).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.interfaces import Runtime, StatementHandler

if TYPE_CHECKING:
    from planner.analyze import analyze
    from planner.handler import Handler

_LAZY = {"analyze": "planner.analyze", "Handler": "planner.handler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")


def build_handler(runtime: Runtime, settings: Mapping[str, Any]) -> StatementHandler:
    """The StatementHandler for the proxy; `settings` is the config's `[planner]` table."""
    from planner.handler import Handler

    return Handler(runtime, settings)


__all__ = ["Handler", "analyze", "build_handler"]
