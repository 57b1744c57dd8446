"""The planner: finds `pgml.*` calls in SQL and runs them in batches (see DESIGN.md).

`build_handler` is the proxy's one entry point; `analyze` is the pure SQL-in, plan-out part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from planner.analyze import analyze
from planner.handler import Handler
from planner.interfaces import Runtime, StatementHandler


def build_handler(runtime: Runtime, settings: Mapping[str, Any]) -> StatementHandler:
    """The StatementHandler for the proxy; `settings` is the config's `[planner]` table."""
    return Handler(runtime, settings)


__all__ = ["Handler", "analyze", "build_handler"]
