"""Circuit breakers (pybreaker) for awaited calls, with their state as a metric.

pybreaker's `call_async` needs Tornado; its `calling()` context manager works
around an awaited call, which is what `Breaker.call` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import pybreaker

from mlplatform import metrics

T = TypeVar("T")


class BreakerOpenError(Exception):
    """The breaker is open: the protected call was not attempted."""


class _StateMetric(pybreaker.CircuitBreakerListener):
    def __init__(self, name: str) -> None:
        self._gauge = metrics.BREAKER_STATE.labels(breaker=name)
        self._gauge.set(0)

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state, new_state) -> None:
        self._gauge.set(metrics.BREAKER_STATE_VALUES.get(new_state.name, 0))


class Breaker:
    """Opens after `fail_max` consecutive failures; after `reset_timeout_s` lets one trial call through.

    Exceptions of the `exclude` types are the caller's fault (bad input, queue full)
    and do not count as failures; neither does a cancelled call.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout_s: float = 10.0,
        exclude: Iterable[type[BaseException]] = (),
    ) -> None:
        self.name = name
        exclude = tuple(exclude)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            # a cancelled call (the caller went away) says nothing about the protected backend
            exclude=[asyncio.CancelledError, *exclude],
            listeners=[_StateMetric(name)],
            name=name,
            # the call that trips the breaker was attempted: its caller gets its own error,
            # BreakerOpenError only ever means "not attempted"
            throw_new_error_on_trip=False,
        )
        self._trial_in_flight = False
        self._excluded = (asyncio.CancelledError, *exclude)

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open`."""
        return self._cb.current_state

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await `fn()` under the breaker; raise BreakerOpenError instead of calling when open."""
        if self._cb.current_state == pybreaker.STATE_CLOSED:
            return await self._call_closed(fn)
        # Open or half-open: a call here is a trial. pybreaker's half-open state lets every call through;
        # while awaited calls overlap, only the first one after the reset timeout is the trial, the others
        # are refused.
        if self._trial_in_flight:
            raise BreakerOpenError(f"circuit breaker {self.name!r} is half-open, its trial call is in flight")
        try:
            with self._cb.calling():
                self._trial_in_flight = True
                try:
                    return await fn()
                finally:
                    self._trial_in_flight = False
        except pybreaker.CircuitBreakerError as exc:
            raise BreakerOpenError(f"circuit breaker {self.name!r} is open") from exc

    async def _call_closed(self, fn: Callable[[], Awaitable[T]]) -> T:
        """The hot path: no lock or context manager per call; an outcome is only reported to pybreaker
        (through its public `call`) when it changes something: a failure, or a success after failures."""
        try:
            result = await fn()
        except self._excluded:
            raise
        except Exception as exc:
            if self._cb.current_state == pybreaker.STATE_CLOSED:  # else another call already tripped it
                self._cb.call(_reraise, exc)  # counts the failure (and may trip); re-raises `exc`
            raise
        if self._cb.fail_counter:
            self._cb.call(_no_op)  # a success resets the consecutive-failure count
        return result


def _reraise(exc: BaseException) -> None:
    raise exc


def _no_op() -> None:
    return None
