"""mlplatform.breaker.Breaker: closed -> open -> half-open -> closed, exclusions, and its state gauge."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import REGISTRY

from mlplatform.breaker import Breaker, BreakerOpenError
from mlplatform.errors import InvalidInputError, QueueFullError

_names = itertools.count()


def unique_name() -> str:
    return f"test-breaker-{next(_names)}"


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("inference_circuit_breaker_state", {"breaker": name})


class Backend:
    """A protected call that fails while `failing` is set and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = True

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)
        if self.failing:
            raise ConnectionError(f"backend down (call {self.calls})")
        return f"ok {self.calls}"


async def test_closed_breaker_passes_results_and_errors_through():
    name = unique_name()
    breaker = Breaker(name, fail_max=3, reset_timeout_s=60)
    backend = Backend()
    backend.failing = False

    assert breaker.state == "closed"
    assert gauge(name) == 0
    assert await breaker.call(backend) == "ok 1"
    backend.failing = True
    with pytest.raises(ConnectionError, match="call 2"):
        await breaker.call(backend)
    assert breaker.state == "closed"
    assert gauge(name) == 0


async def test_opens_after_fail_max_failures_and_stops_calling():
    name = unique_name()
    breaker = Breaker(name, fail_max=3, reset_timeout_s=60)
    backend = Backend()

    for i in range(1, 4):
        # each attempted call fails with its own error, including the one that trips the breaker
        with pytest.raises(ConnectionError, match=f"call {i}"):
            await breaker.call(backend)
    assert breaker.state == "open"
    assert gauge(name) == 2

    for _ in range(5):
        with pytest.raises(BreakerOpenError, match=name):
            await breaker.call(backend)
    assert backend.calls == 3  # open: never called


async def test_success_resets_the_failure_count():
    breaker = Breaker(unique_name(), fail_max=3, reset_timeout_s=60)
    backend = Backend()
    for _ in range(5):
        backend.failing = True
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await breaker.call(backend)
        backend.failing = False
        await breaker.call(backend)
    assert breaker.state == "closed"


async def test_half_open_trial_success_closes_the_breaker():
    name = unique_name()
    breaker = Breaker(name, fail_max=2, reset_timeout_s=0.2)
    backend = Backend()
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(backend)
    assert breaker.state == "open"
    with pytest.raises(BreakerOpenError):
        await breaker.call(backend)

    await asyncio.sleep(0.3)
    backend.failing = False
    states_during_trial = []

    async def trial() -> str:
        states_during_trial.append((breaker.state, gauge(name)))
        return await backend()

    assert await breaker.call(trial) == "ok 3"
    assert states_during_trial == [("half-open", 1)]
    assert breaker.state == "closed"
    assert gauge(name) == 0
    assert await breaker.call(backend) == "ok 4"


async def test_half_open_trial_failure_reopens_the_breaker():
    name = unique_name()
    breaker = Breaker(name, fail_max=1, reset_timeout_s=0.2)
    backend = Backend()
    with pytest.raises(ConnectionError):
        await breaker.call(backend)
    assert breaker.state == "open"

    await asyncio.sleep(0.3)
    with pytest.raises(ConnectionError, match="call 2"):  # the trial's own error
        await breaker.call(backend)
    assert breaker.state == "open"
    assert gauge(name) == 2
    with pytest.raises(BreakerOpenError):
        await breaker.call(backend)
    assert backend.calls == 2


async def test_half_open_lets_only_one_trial_through():
    name = unique_name()
    breaker = Breaker(name, fail_max=1, reset_timeout_s=0.2)
    backend = Backend()
    with pytest.raises(ConnectionError):
        await breaker.call(backend)
    await asyncio.sleep(0.3)

    release = asyncio.Event()
    trials = 0

    async def slow_success() -> str:
        nonlocal trials
        trials += 1
        await release.wait()
        return "recovered"

    first = asyncio.create_task(breaker.call(slow_success))
    await asyncio.sleep(0.01)
    assert breaker.state == "half-open"
    # while the trial is in flight, other callers are refused without a call
    others = await asyncio.gather(*(breaker.call(slow_success) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(o, BreakerOpenError) for o in others), others
    assert trials == 1

    release.set()
    assert await first == "recovered"
    assert breaker.state == "closed"
    assert await breaker.call(slow_success) == "recovered"
    assert trials == 2


async def test_excluded_exceptions_do_not_count():
    name = unique_name()
    breaker = Breaker(name, fail_max=2, reset_timeout_s=60, exclude=(InvalidInputError, QueueFullError))

    async def bad_input():
        raise InvalidInputError("row 3: amount is negative")

    async def queue_full():
        raise QueueFullError("busy")

    for _ in range(10):
        with pytest.raises(InvalidInputError, match="row 3"):
            await breaker.call(bad_input)
        with pytest.raises(QueueFullError):
            await breaker.call(queue_full)
    assert breaker.state == "closed"
    assert gauge(name) == 0

    backend = Backend()
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(backend)
    assert breaker.state == "open"
    assert gauge(name) == 2


async def test_breakers_are_independent():
    a, b = unique_name(), unique_name()
    breaker_a = Breaker(a, fail_max=1, reset_timeout_s=60)
    breaker_b = Breaker(b, fail_max=1, reset_timeout_s=60)
    with pytest.raises(ConnectionError):
        await breaker_a.call(Backend())
    assert (breaker_a.state, breaker_b.state) == ("open", "closed")
    assert (gauge(a), gauge(b)) == (2, 0)


async def test_cancelled_calls_are_not_failures():
    """A caller that goes away (client cancel, RPC deadline) is not a failure of the protected backend."""
    name = unique_name()
    breaker = Breaker(name, fail_max=2, reset_timeout_s=60)
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.sleep(30)

    for _ in range(4):
        started.clear()
        task = asyncio.create_task(breaker.call(hangs))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait([task, waiter], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert started.is_set(), f"the call was refused: {task.exception()!r}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert breaker.state == "closed"
    assert gauge(name) == 0
