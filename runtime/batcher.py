"""One bounded queue per model, shared by every connection, drained by a single owner task.

Owns micro-batching: callers `submit` items and await futures; the owner closes a batch
on `max_batch_size` items, a token budget, `wait_s` after its first item or a quarter of
that with no new item; sorts the
batch by length to cut padding; skips items whose caller was cancelled; runs the batch
in a thread pool (never on the event loop) and checks outputs one for one against
inputs. A full queue answers `InsufficientResources` (53000) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from core.errors import InsufficientResources, InternalError, PgError

RunBatch = Callable[[list[Any]], Sequence[Any]]
# The quiet gap that closes a batch early, as a share of wait_s.
_QUIET_GAP = 0.25


@dataclass(slots=True)
class _Item:
    payload: Any
    cost: int
    future: asyncio.Future[Any]


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    items: int = 0
    dropped_cancelled: int = 0
    last_batch_sizes: list[int] = field(default_factory=list)


class Batcher:
    """A model's queue. `run` is called in `executor` with a list of payloads."""

    def __init__(
        self,
        name: str,
        run: RunBatch,
        executor: Executor,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        wait_s: float,
        queue_size: int,
        in_flight: int = 2,
    ) -> None:
        self.name = name
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.wait_s = wait_s
        self.queue_size = queue_size
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        # Two batches in flight: the next one tokenises while the current one runs the model.
        self._slots = asyncio.Semaphore(in_flight)
        self._owner: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.stats = BatcherStats()

    async def submit(self, payloads: Sequence[Any], costs: Sequence[int]) -> list[Any]:
        """Queue every payload and return their outputs in order.

        Raises InsufficientResources when the queue cannot take them all; the error the
        batch raised otherwise. Cancelling the caller drops its queued items.
        """
        if self._queue.qsize() + len(payloads) > self.queue_size:
            raise InsufficientResources(
                f'the queue of model "{self.name}" is full ({self.queue_size} items)',
                hint="retry later, or raise runtime.queue_size",
            )
        self._ensure_owner()
        loop = asyncio.get_running_loop()
        futures = []
        for payload, cost in zip(payloads, costs, strict=True):
            fut: asyncio.Future[Any] = loop.create_future()
            self._queue.put_nowait(_Item(payload, cost, fut))
            futures.append(fut)
        # Cancelling the caller cancels the futures it waits on: the owner then skips them.
        if len(futures) == 1:
            return [await futures[0]]  # one row: no gather (its bookkeeping costs per call)
        return list(await asyncio.gather(*futures))

    def _ensure_owner(self) -> None:
        if self._owner is None or self._owner.done():
            self._owner = asyncio.get_running_loop().create_task(self._own(), name=f"batcher:{self.name}")

    async def close(self) -> None:
        if self._owner is not None:
            self._owner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._owner
        for task in list(self._running):
            with contextlib.suppress(BaseException):
                await task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(InsufficientResources(f'model "{self.name}" was unloaded'))

    async def _own(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_live(self, timeout: float | None) -> _Item | None:
        """The next item whose caller still waits; None when `timeout` passes first."""
        while True:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            elif timeout is None:
                item = await self._queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
                except TimeoutError:
                    return None
            if not item.future.done():
                return item
            self.stats.dropped_cancelled += 1

    async def _form_batch(self) -> list[_Item]:
        first = await self._next_live(None)
        assert first is not None
        batch, tokens = [first], first.cost
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            # Whatever is already queued joins at once; only an empty queue waits, and not past
            # a short quiet gap: a burst (callers resubmitting as their results arrive) is over
            # when the queue stays empty that long, so the batch need not wait out all of wait_s.
            item = await self._next_live(min(deadline - time.monotonic(), self.wait_s * _QUIET_GAP))
            if item is None:
                break
            if tokens + item.cost > self.max_batch_tokens:
                # Over budget: this item opens the next batch instead.
                self._requeue_front(item)
                break
            batch.append(item)
            tokens += item.cost
        return batch

    def _requeue_front(self, item: _Item) -> None:
        # asyncio.Queue has no push-front; its deque is the documented storage.
        self._queue._queue.appendleft(item)  # type: ignore[attr-defined]
        self._queue._unfinished_tasks += 1  # type: ignore[attr-defined]

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            live = [it for it in batch if not it.future.done()]
            self.stats.dropped_cancelled += len(batch) - len(live)
            if not live:
                return
            # Similar lengths together cut padding; results go back by identity, not order.
            live.sort(key=lambda it: it.cost)
            self.stats.batches += 1
            self.stats.items += len(live)
            self.stats.last_batch_sizes = [*self.stats.last_batch_sizes[-15:], len(live)]
            loop = asyncio.get_running_loop()
            payloads = [it.payload for it in live]
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, payloads)
                if len(outputs) != len(live):
                    raise InternalError(
                        f'model "{self.name}" returned {len(outputs)} outputs for {len(live)} inputs'
                    )
            except PgError as exc:
                _fail(live, exc)
                return
            except Exception as exc:
                _fail(live, InternalError(f'model "{self.name}" failed: {type(exc).__name__}: {exc}'))
                return
            for it, out in zip(live, outputs, strict=True):
                if it.future.done():
                    continue
                # A batch function may fail some items only (a group with bad arguments).
                if isinstance(out, BaseException):
                    it.future.set_exception(out)
                else:
                    it.future.set_result(out)
        finally:
            self._slots.release()


def _fail(items: list[_Item], exc: PgError) -> None:
    for it in items:
        if not it.future.done():
            it.future.set_exception(exc)
