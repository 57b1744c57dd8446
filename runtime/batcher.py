"""The one micro-batcher: a bounded queue per model (or model and operation), one owner task.

Serves embed, rank, transform and tabular predict. Callers `submit` items (or `submit_one`)
and await futures; the owner closes a batch by its `Policy`: `max_batch_size` items, a
cost (token or row) budget, a time budget (the batch's cost is capped by what the model
ran per second so far, so a stop lands within about one batch), and either `wait_s` after
the first item (a quarter of it with no new item) or, with `wait_s` 0, a few turns of the
event loop while the queue keeps growing (a lone one-row call waits one turn). It sorts
the batch by cost to cut padding, runs it in a thread pool and checks outputs one for one
against inputs. Only a batch its owner's `inline(payloads)` says is cheap (a compiled tabular
model's few rows: tens of microseconds) runs on the event loop instead: the hop to a thread
and back costs more than that on a busy machine, and so little blocking holds no one up.
"Cheap" is also measured: a batch runs inline only while the model's measured CPU time on
the loop, per unit of cost, puts that batch under `Policy.inline_budget_s`, so a model that
turns out slow never stalls the loop twice. `run_now` runs one payload at once, in the
caller, when the queue is empty and it may run inline (`can_run_now`): no queue, future or
owner turn, which for a compiled model's row cost several times the model's own ~20 us.
It is for callers that gain by not waiting at all (the planner's fast path answers a whole
statement in one turn of the loop); `submit_one` still queues, so concurrent callers that
await anyway share one library call.
Items whose caller was cancelled or whose statement was stopped (`core.stop.Stop`) are
dropped from the queue, and a batch whose items are all stopped is abandoned when its
thread starts. A full queue answers `InsufficientResources` (53000) at once.
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
from core.stop import Stop

RunBatch = Callable[[list[Any]], Sequence[Any]]
# The quiet gap that closes a batch early, as a share of wait_s.
_QUIET_GAP = 0.25
# How much the newest batch weighs in the seconds-per-cost estimate.
_RATE_WEIGHT = 0.3
# Inline runs measure their CPU time once in this many (and always until a first figure): a
# thread's CPU clock is a system call, not the vDSO, and cost as much as a small model's run.
_CPU_SAMPLE = 16
# One run in this many that the inline estimate keeps off the loop runs on it anyway, measured.
_PROBE_EVERY = 64


@dataclass(frozen=True, slots=True)
class Policy:
    """How one batcher forms its batches."""

    max_batch_size: int = 64
    max_batch_tokens: int = 16384  # the cost budget: tokens (language models) or rows (tabular)
    wait_s: float = 0.002  # 0: no timer, a few loop turns (see the module docstring)
    queue_size: int = 4096  # queued items, all callers together
    in_flight: int = 2  # batches running or formed at once; 1 runs them in the owner
    time_budget_s: float = 1.0  # 0: no time cap; a stop lands within about this much model time
    wait_turns: int = 4
    # The longest a batch may be expected to take (at the rate measured on the loop) and still
    # run on the event loop when `inline` allows it; 0: no measured bound.
    inline_budget_s: float = 0.0


@dataclass(slots=True)
class _Item:
    payload: Any
    cost: int
    future: asyncio.Future[Any]
    stop: Stop | None

    def dead(self) -> bool:
        return self.future.done() or (self.stop is not None and self.stop.stopped)


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    items: int = 0
    cost: int = 0  # tokens or rows run
    dropped_cancelled: int = 0
    abandoned: int = 0  # batches whose every item was stopped before their thread ran them
    last_batch_sizes: list[int] = field(default_factory=list)


class Batcher:
    """A model's queue. `run` is called in `executor` with a list of payloads."""

    def __init__(
        self,
        name: str,
        run: RunBatch,
        executor: Executor | None,
        policy: Policy | None = None,
        inline: Callable[[list[Any]], bool] | None = None,
        **settings: Any,
    ) -> None:
        """`policy`, or a Policy of `settings` (its field names). `inline(payloads)`: whether
        a batch of these runs on the event loop rather than in `executor` (None: never).
        Measured times cannot decide it: in a thread, the wait for the GIL counts too."""
        self.name = name
        self._run = run
        self._executor = executor
        self._inline_fn = inline
        self.policy = policy = policy or Policy(**settings)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        # Two batches in flight: the next one tokenises while the current one runs the model.
        self._slots = asyncio.Semaphore(policy.in_flight)
        self._owner: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._sec_per_cost = 0.0  # measured; 0 until the first batch
        # An inline run's CPU time on the loop (no GIL wait in it) as a fixed part, a run of cost
        # 1, and a part per further unit of cost (the rows of several clients' one-row statements
        # answered together cost little more than one). 0 / -1 until measured.
        self._inline_first = 0.0
        self._inline_extra = -1.0
        self._inline_runs = 0
        self._refused = 0  # runs kept off the loop by the estimate
        self._probe_every = _PROBE_EVERY
        self._probe = False  # the next inline run is a probe past the estimate: measure it
        self.stats = BatcherStats()

    @property
    def queued(self) -> int:
        """Items waiting for a batch (the queue depth the dashboard shows)."""
        return self._queue.qsize()

    def _check_room(self, n: int) -> None:
        if self._queue.qsize() + n > self.policy.queue_size:
            raise InsufficientResources(
                f'the queue of model "{self.name}" is full ({self.policy.queue_size} items)',
                hint="retry later, or raise runtime.queue_size",
            )
        if self._owner is None or self._owner.done():
            self._owner = asyncio.get_running_loop().create_task(self._own(), name=f"batcher:{self.name}")

    async def submit_one(self, payload: Any, cost: int, stop: Stop | None = None) -> Any:
        """The output for one payload (no lists, no gather: the one-row path)."""
        self._check_room(1)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(payload, cost, fut, stop))
        if stop is None:
            return await fut
        fail = _failer([fut], stop)
        stop.add(fail)
        try:
            return await fut
        finally:
            stop.discard(fail)

    async def submit(
        self, payloads: Sequence[Any], costs: Sequence[int], stop: Stop | None = None
    ) -> list[Any]:
        """Queue every payload and return their outputs in order.

        Raises InsufficientResources when the queue cannot take them, the statement's 57014
        when `stop` is stopped, the error the batch raised otherwise. Cancelling the caller,
        or stopping its statement, drops its queued items. More payloads than a quarter of
        the queue (a statement's chunk of rows) go in slices, two queued at a time, so one
        statement never fills the queue and never gets 53000 from an idle model.
        """
        step = max(1, self.policy.queue_size // 4)
        if len(payloads) <= step:
            return await self._submit(payloads, costs, stop)
        out: list[Any] = []
        ahead: asyncio.Future[list[Any]] | None = None
        try:
            for i in range(0, len(payloads), step):
                nxt = asyncio.ensure_future(self._submit(payloads[i : i + step], costs[i : i + step], stop))
                if ahead is not None:
                    out.extend(await ahead)
                ahead = nxt
            assert ahead is not None
            out.extend(await ahead)
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()
        return out

    async def _submit(self, payloads: Sequence[Any], costs: Sequence[int], stop: Stop | None) -> list[Any]:
        self._check_room(len(payloads))
        loop = asyncio.get_running_loop()
        futures = []
        for payload, cost in zip(payloads, costs, strict=True):
            fut: asyncio.Future[Any] = loop.create_future()
            self._queue.put_nowait(_Item(payload, cost, fut, stop))
            futures.append(fut)
        fail = _failer(futures, stop) if stop is not None else None
        if stop is not None and fail is not None:
            stop.add(fail)
        try:
            # Cancelling the caller cancels the futures it waits on: the owner then skips them.
            if len(futures) == 1:
                return [await futures[0]]  # one row: no gather (its bookkeeping costs per call)
            return list(await asyncio.gather(*futures))
        finally:
            if stop is not None and fail is not None:
                stop.discard(fail)

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
        inline = self.policy.in_flight == 1
        while True:
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            if inline:  # one at a time: the next batch gathers while this one runs
                await self._execute(batch)
                continue
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
            elif timeout <= 0:
                return None
            else:
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    return None
            if not item.dead():
                return item
            self.stats.dropped_cancelled += 1

    def _cost_cap(self) -> int:
        p = self.policy
        if p.time_budget_s <= 0 or self._sec_per_cost <= 0:
            return p.max_batch_tokens
        return max(1, min(p.max_batch_tokens, int(p.time_budget_s / self._sec_per_cost)))

    async def _form_batch(self) -> list[_Item]:
        first = await self._next_live(None)
        assert first is not None
        batch, cost = [first], first.cost
        cap, p = self._cost_cap(), self.policy
        if p.wait_s <= 0:
            await self._loop_turns()
        deadline = time.monotonic() + p.wait_s
        while len(batch) < p.max_batch_size and cost < cap:
            # Whatever is already queued joins at once; only an empty queue waits, and not past
            # a short quiet gap: a burst (callers resubmitting as their results arrive) is over
            # when the queue stays empty that long, so the batch need not wait out all of wait_s.
            wait = min(deadline - time.monotonic(), p.wait_s * _QUIET_GAP)
            item = await self._next_live(wait)
            if item is None:
                break
            if cost + item.cost > cap:
                # Over budget: this item opens the next batch instead.
                self._requeue_front(item)
                break
            batch.append(item)
            cost += item.cost
        return batch

    async def _loop_turns(self) -> None:
        # Callers that are already runnable join this batch, for as long as the queue keeps
        # growing: a lone request waits one turn, and no timer is involved.
        for _ in range(self.policy.wait_turns):
            size = self._queue.qsize()
            await asyncio.sleep(0)
            if self._queue.qsize() == size:
                return

    def _requeue_front(self, item: _Item) -> None:
        # asyncio.Queue has no push-front; its deque is the documented storage.
        self._queue._queue.appendleft(item)  # type: ignore[attr-defined]
        self._queue._unfinished_tasks += 1  # type: ignore[attr-defined]

    def can_run_now(self, payload: Any, cost: int) -> bool:
        """Whether `run_now` may run this payload: nothing queued ahead of it, and it may run
        inline (the owner's test and the measured budget)."""
        return self._queue.empty() and self._inline([payload], cost)

    def run_now(self, payload: Any, cost: int) -> Any:
        """One payload run now, on the loop, in the caller (after `can_run_now`): the same
        output, errors and stats as a batch of one from the queue."""
        try:
            outputs = self._timed([payload], cost, True)
            if len(outputs) != 1:
                raise InternalError(f'model "{self.name}" returned {len(outputs)} outputs for 1 input')
        except PgError:
            raise
        except Exception as exc:
            raise InternalError(f'model "{self.name}" failed: {type(exc).__name__}: {exc}') from exc
        self._count(1, cost)
        out = outputs[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def _timed(self, payloads: list[Any], cost: int, inline: bool) -> Sequence[Any]:
        """`run(payloads)`, its time per unit of cost folded into the estimates."""
        measure = probe = False
        if inline:
            self._inline_runs += 1
            probe, self._probe = self._probe, False
            measure = (
                self._inline_first <= 0
                or (cost > 1 and self._inline_extra < 0)
                or self._inline_runs % _CPU_SAMPLE == 0
                or probe
            )
        started, cpu = time.perf_counter(), time.thread_time() if measure else 0.0
        outputs = self._run(payloads)
        took = time.perf_counter() - started
        rate = took / (cost or 1)
        old = self._sec_per_cost
        self._sec_per_cost = rate if old <= 0 else old + _RATE_WEIGHT * (rate - old)
        # The inline estimate learns from runs on the loop, in CPU time: on a loaded machine the
        # loop's thread is often preempted mid-run, and that time is not the model's (by wall
        # time a 20 us predict measured 2 ms now and then). Any run's wall time (GIL waits
        # included) is an upper bound, so it may only lower the estimate: a slow first run (a
        # cold model) does not keep the model off the loop for good.
        self._learn_inline(time.thread_time() - cpu if measure else took, cost, measure)
        if probe:  # still over the budget: probe half as often (a model that is simply too slow)
            self._probe_every = _PROBE_EVERY if self._fits(1) else min(self._probe_every * 2, 1 << 16)
        return outputs

    def _learn_inline(self, took: float, cost: int, measured: bool) -> None:
        """Fold one run into the inline estimate: `took` is CPU time when `measured`, else wall
        time, an upper bound that may only lower each part (a run of any size bounds the fixed
        part: the part per row is never negative). A measured run below the fixed part replaces
        it: CPU time is not noise on the low side (a cold first run measured 5 ms, 40 us after)."""
        first, extra = self._inline_first, self._inline_extra
        if first <= 0 or (measured and took < first):
            self._inline_first = first = took
        elif (measured and cost <= 1) or took < first:
            self._inline_first = first = first + _RATE_WEIGHT * (took - first)
        if cost > 1:
            seen = max(took - first, 0.0) / (cost - 1)
            if measured or (extra >= 0 and seen < extra):
                self._inline_extra = seen if extra < 0 else extra + _RATE_WEIGHT * (seen - extra)

    def _run_unless_stopped(self, live: list[_Item]) -> Sequence[Any] | None:
        """In the worker thread: the batch's outputs, or None when every item was stopped
        while the batch waited for its thread (a boundary where a stop lands)."""
        if all(it.stop is not None and it.stop.stopped for it in live):
            return None
        return self._timed([it.payload for it in live], sum(it.cost for it in live), False)

    def _run_inline(self, live: list[_Item]) -> Sequence[Any] | None:
        if all(it.stop is not None and it.stop.stopped for it in live):
            return None
        return self._timed([it.payload for it in live], sum(it.cost for it in live), True)

    def _fits(self, cost: int) -> bool:
        """Whether the inline estimate puts a run of `cost` within the budget. A larger run than
        any measured yet is tried once, and measured, when one row fits."""
        budget = self.policy.inline_budget_s
        return budget <= 0 or self._inline_first + max(self._inline_extra, 0.0) * max(cost - 1, 0) <= budget

    def _inline(self, payloads: list[Any], cost: int) -> bool:
        """Whether these payloads run on the loop: the owner says they may, and the measured
        rate on the loop (once there is one) puts them within the inline budget."""
        if self._inline_fn is None or not self._inline_fn(payloads):
            return False
        if self._fits(cost):
            return True
        # Over the budget: one run in _PROBE_EVERY is still tried on the loop, and measured, so an
        # estimate that a slow moment raised comes down again.
        self._refused += 1
        if self._refused % self._probe_every == 0:
            self._probe = True
            return True
        return False

    def _count(self, items: int, cost: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.items += items
        stats.cost += cost
        stats.last_batch_sizes = [*stats.last_batch_sizes[-15:], items]

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            live = [it for it in batch if not it.dead()]
            self.stats.dropped_cancelled += len(batch) - len(live)
            if not live:
                return
            if len(live) > 1:  # similar lengths together cut padding; results go back by identity
                live.sort(key=lambda it: it.cost)
            loop = asyncio.get_running_loop()
            try:
                if self._inline([it.payload for it in live], sum(it.cost for it in live)):
                    outputs = self._run_inline(live)
                else:
                    outputs = await loop.run_in_executor(self._executor, self._run_unless_stopped, live)
                if outputs is None:
                    self.stats.abandoned += 1
                    for it in live:  # stopped by a deadline the loop's timer has not seen yet
                        if not it.future.done() and it.stop is not None:
                            it.future.set_exception(it.stop.error())
                    return
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
            self._count(len(live), sum(it.cost for it in live))
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


def _failer(futures: list[asyncio.Future[Any]], stop: Stop) -> Callable[[], None]:
    def fail() -> None:
        for fut in futures:
            if not fut.done():
                fut.set_exception(stop.error())

    return fail


def _fail(items: list[_Item], exc: PgError) -> None:
    for it in items:
        if not it.future.done():
            it.future.set_exception(exc)
