"""The model runtime: language models (embed, transform, rank, chunk) and, in `runtime.tabular`,
the tabular models; `Runtime` is the one object the planner talks to."""

from runtime.config import RuntimeConfig
from runtime.facade import Runtime

__all__ = ["Runtime", "RuntimeConfig"]
