"""Loaded models: each loaded once for every connection, evicted least-recently-used.

Owns the table of loaded models (name, kind, engine, device, memory, load time), one
load per model even when many connections ask at once, the memory budget (LRU eviction
of idle models), and each model's batcher. `SHOW MODELS` reads `info()`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.errors import InternalError, InvalidParameterValue, PgError
from runtime.batcher import Batcher, Policy
from runtime.config import RuntimeConfig


class ModelObject(Protocol):
    kind: str
    note: str

    @property
    def placement(self) -> Any: ...

    def memory_bytes(self) -> int: ...


@dataclass(slots=True)
class Loaded:
    key: str
    name: str
    obj: Any
    batcher: Batcher
    memory_bytes: int
    loaded_at: float  # Unix time, as the admin console formats it
    load_seconds: float
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0  # calls in progress: never evict a model that is running
    names: list[str] = field(default_factory=list)  # every name it was asked by, first first
    # What SHOW MODELS adds to the precision: a torch model serving while its ONNX export runs.
    status: str = ""

    def __post_init__(self) -> None:
        if not self.names:
            self.names.append(self.name)


class ModelCache:
    """Loaded models keyed by (kind, content key, engine, device): one load serves every alias."""

    def __init__(self, config: RuntimeConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def peek(self, key: str) -> Loaded | None:
        """The loaded model for `key` if there is one; loads nothing and marks nothing used."""
        return self._models.get(key)

    async def get(
        self,
        key: str,
        name: str,
        loader: Callable[[], Any],
        run_attr: str = "run",
        executor: Executor | None = None,
    ) -> Loaded:
        """The loaded model for `key`, loading it (off the loop, in `executor` if given) on first use."""
        entry = self._models.get(key)
        if entry is None:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                entry = self._models.get(key)
                if entry is None:
                    entry = await self._load(key, name, loader, run_attr, executor or self.executor)
        if name not in entry.names:
            # Keys are by content: another alias of a loaded model shares it, and is listed.
            entry.names.append(name)
        self._models.move_to_end(key)
        entry.last_used = time.monotonic()
        return entry

    async def _load(
        self, key: str, name: str, loader: Callable[[], Any], run_attr: str, executor: Executor
    ) -> Loaded:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            obj = await loop.run_in_executor(executor, loader)
        except PgError:
            raise
        except (ValueError, OSError, KeyError, TypeError) as exc:
            # Files that exist but are not a model of the kind asked for (or are damaged).
            raise InvalidParameterValue(
                f'model "{name}" cannot be loaded: {type(exc).__name__}: {str(exc)[:500]}'
            ) from exc
        except Exception as exc:
            raise InternalError(f'model "{name}" failed to load: {type(exc).__name__}: {exc}') from exc
        cfg = self.config
        policy = Policy(
            max_batch_size=cfg.max_batch_size,
            max_batch_tokens=cfg.max_batch_tokens,
            wait_s=cfg.batch_wait_ms / 1000.0,
            queue_size=cfg.queue_size,
        )
        batcher = Batcher(name, getattr(obj, run_attr), self.executor, policy)
        entry = Loaded(
            key,
            name,
            obj,
            batcher,
            int(obj.memory_bytes()),
            time.time(),
            time.monotonic() - started,
        )
        self._models[key] = entry
        await self._evict_over_budget(keep=key)
        return entry

    async def _evict_over_budget(self, keep: str) -> None:
        budget = self.config.memory_budget_mb * 1024 * 1024
        for key in list(self._models):
            if sum(m.memory_bytes for m in self._models.values()) <= budget:
                break
            # No reference to the entry may outlive this test: held across `unload`, it would
            # keep the model alive through unload's collection and trim.
            if key == keep or self._models[key].users:
                continue
            await self.unload(key)

    async def unload(self, key: str) -> None:
        entry = self._models.pop(key, None)
        if entry is None:
            return
        await entry.batcher.close()
        del entry
        gc.collect()
        _free_cuda_cache()
        _trim_heap()

    async def close(self) -> None:
        for key in list(self._models):
            await self.unload(key)

    def info(self) -> list[dict[str, Any]]:
        out = []
        for entry in self._models.values():
            placement = entry.obj.placement
            out.append(
                {
                    "name": ", ".join(entry.names),
                    "kind": entry.obj.kind,
                    "engine": placement.engine,
                    "device": placement.device,
                    "precision": entry.obj.note + (f"; {entry.status}" if entry.status else ""),
                    "memory_bytes": entry.memory_bytes,
                    "loaded_at": entry.loaded_at,
                    "load_seconds": round(entry.load_seconds, 3),
                    "batches": entry.batcher.stats.batches,
                    "items": entry.batcher.stats.items,
                    "queued": entry.batcher.queued,
                }
            )
        return out


_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (it has mallopt and malloc_trim); None elsewhere (musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def set_mmap_threshold(kb: int) -> None:
    """Have glibc serve allocations of `kb` KiB and more with mmap (RuntimeConfig says why);
    0 keeps its default. Process-wide, and once: the runtime owns the process's model memory."""
    libc = _glibc()
    if kb > 0 and libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, kb * 1024)


def _trim_heap() -> None:
    """Give the freed heap back to the system: glibc keeps a freed model's pages (its weights
    are many small and medium allocations) in its arenas, so without this an evicted model's
    memory stays resident, only reusable by this process (benchmarks/coldstart.py measures it)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
