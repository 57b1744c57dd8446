"""`Stop`: one statement's stop scope, shared by the proxy, the planner and the runtime.

The proxy makes one per statement and stops it on a CancelRequest, a vanished client or
when the client's `statement_timeout` runs out (a timer on the event loop). The planner
and the runtime register callbacks for the awaits that must end at once (a runtime call,
a queued batch item); worker threads poll `stopped` between batches and iterations, which
is thread-safe (a plain attribute and the monotonic clock). `error()` is the 57014 that
Postgres sends for that reason, worded as Postgres words it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from core.errors import InvalidParameterValue, QueryCanceled

USER_REQUEST = "canceling statement due to user request"
TIMEOUT = "canceling statement due to statement timeout"
# statement_timeout as current_setting() shows it: a number and Postgres's unit (ms when none).
_SETTING = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*$")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0, "d": 86_400_000.0}


def timeout_ms(setting: str) -> float:
    """Milliseconds of a `current_setting('statement_timeout')` value; 0 means none."""
    found = _SETTING.match(setting)
    if found is None:
        raise InvalidParameterValue(f'invalid value for parameter "statement_timeout": "{setting}"')
    return float(found.group(1)) * _UNIT_MS[found.group(2) or "ms"]


class Stop:
    """Why one statement's work must end, once it must; see the module docstring."""

    __slots__ = ("_callbacks", "_deadline", "_timer", "reason", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.reason: str | None = None
        self._deadline: float | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def stopped(self) -> bool:
        """Whether the work must end; safe to read from any thread."""
        if self.reason is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = TIMEOUT  # a thread may see the deadline pass before the loop's timer
        return self.reason is not None

    def error(self) -> QueryCanceled:
        return QueryCanceled(self.reason or USER_REQUEST)

    def check(self) -> None:
        """Raise the 57014 when the work must end."""
        if self.stopped:
            raise self.error()

    def stop(self, reason: str = USER_REQUEST) -> None:
        """End the work (on the event loop): the first reason wins, every callback runs once."""
        if self.reason is None:
            self.reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def set_timeout(self, ms: float) -> None:
        """The client's statement_timeout, counted from the statement's start; 0: none."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ms <= 0:
            self._deadline = None
            return
        self._deadline = self.started + ms / 1000.0
        left = self._deadline - time.monotonic()
        if left <= 0:
            self.stop(TIMEOUT)
        else:
            self._timer = asyncio.get_running_loop().call_later(left, self.stop, TIMEOUT)

    def add(self, callback: Callable[[], None]) -> None:
        """Run `callback` (on the event loop) when the work is stopped; at once if it is."""
        if self.reason is not None:
            callback()
        else:
            self._callbacks.append(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        try:
            self._callbacks.remove(callback)
        except ValueError:
            pass

    def close(self) -> None:
        """The statement is over: its timer goes, and nothing registered runs any more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._callbacks = []
