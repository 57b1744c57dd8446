"""One micro-batcher per (model, operation): rows from many callers, one library call per batch.

A single owner task drains its queue: it takes whatever has arrived within a few turns of
the event loop (up to `max_rows`), runs one batched predict in a worker thread, and hands
each caller its own slice. While a batch runs the next one accumulates, so under load
batches grow without any timer and a lone request waits one loop turn. The queue is
bounded: a full queue answers 53000.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from core.errors import InsufficientResources


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]


class Batcher:
    """Batches calls of `fn` (rows in, one output row per input row out)."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        executor: Executor | None,
        max_rows: int = 4096,
        max_queue: int = 10000,
    ) -> None:
        self._fn = fn
        self._executor = executor
        self._max_rows = max_rows
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # library calls made
        self.rows = 0  # rows predicted by them

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """The outputs for `rows` (2-D); raises InsufficientResources when the queue is full."""
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise InsufficientResources("the prediction queue of this model is full; retry later") from None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            # Turns of the event loop (no timer) let callers that are already runnable join
            # this batch, for as long as the queue keeps growing: a lone request waits one turn.
            for _ in range(4):
                size = self._queue.qsize()
                await asyncio.sleep(0)
                if self._queue.qsize() == size:
                    break
            n = len(items[0].rows)
            while n < self._max_rows and not self._queue.empty():
                items.append(self._queue.get_nowait())
                n += len(items[-1].rows)
            items = [i for i in items if not i.future.done()]  # cancelled callers are skipped
            if not items:
                continue
            try:
                x = items[0].rows if len(items) == 1 else np.vstack([i.rows for i in items])
                self.batches += 1
                self.rows += len(x)
                out = await loop.run_in_executor(self._executor, self._fn, x)
                if len(out) != len(x):
                    raise RuntimeError(f"model returned {len(out)} outputs for {len(x)} rows")
            except Exception as exc:
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(exc)
                continue
            start = 0
            for i in items:
                end = start + len(i.rows)
                if not i.future.done():
                    i.future.set_result(out[start:end])
                start = end

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
