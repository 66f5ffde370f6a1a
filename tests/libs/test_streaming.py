"""mlplatform.streaming.ordered_concurrent: concurrent handling, in-order answers, bounded in-flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mlplatform.streaming import ordered_concurrent


async def stream_of(items) -> AsyncIterator:
    for item in items:
        yield item


class ConcurrencyProbe:
    """A handler that sleeps `delays[index]` and tracks how many calls run at once."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.active = 0
        self.max_active = 0
        self.started: list[int] = []
        self.finished: list[int] = []

    async def __call__(self, index: int, message: str) -> tuple[int, str]:
        self.started.append(index)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delays[index])
        finally:
            self.active -= 1
        self.finished.append(index)
        return index, message.upper()


async def collect(agen: AsyncIterator) -> list:
    return [item async for item in agen]


async def test_answers_in_request_order_when_handlers_finish_out_of_order():
    messages = [f"m{i}" for i in range(8)]
    # later messages finish first
    probe = ConcurrencyProbe([0.08 - 0.01 * i for i in range(8)])

    out = await collect(ordered_concurrent(stream_of(messages), probe, max_in_flight=8))

    assert out == [(i, f"M{i}") for i in range(8)]
    assert probe.finished != sorted(probe.finished), "handlers did not finish out of order"
    assert probe.finished[0] == 7


async def test_handlers_run_concurrently():
    probe = ConcurrencyProbe([0.02] * 10)
    out = await collect(ordered_concurrent(stream_of([str(i) for i in range(10)]), probe, max_in_flight=16))
    assert [i for i, _ in out] == list(range(10))
    assert probe.max_active > 1


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_max_in_flight_bounds_concurrency(limit):
    n = 12
    probe = ConcurrencyProbe([0.01] * n)
    out = await collect(ordered_concurrent(stream_of([str(i) for i in range(n)]), probe, max_in_flight=limit))
    assert [i for i, _ in out] == list(range(n))
    assert probe.max_active == limit


async def test_reading_pauses_when_in_flight_is_full():
    """With a slow consumer, the request stream is not read far ahead of the answers."""
    limit = 2
    read: list[int] = []

    async def requests():
        for i in range(10):
            read.append(i)
            yield i

    async def handle(index: int, message: int) -> int:
        return message * 10

    got = []
    async for answer in ordered_concurrent(requests(), handle, max_in_flight=limit):
        got.append(answer)
        await asyncio.sleep(0.01)  # a slow client
        assert len(read) - len(got) <= limit + 1, f"read {len(read)} messages, answered {len(got)}"
    assert got == [i * 10 for i in range(10)]


async def test_empty_stream_yields_nothing():
    called = []

    async def handle(index, message):
        called.append(index)
        return message

    assert await collect(ordered_concurrent(stream_of([]), handle)) == []
    assert called == []


async def test_handler_exception_ends_the_stream_and_cancels_pending():
    cancelled = []

    async def handle(index: int, message: int) -> int:
        if index == 1:
            raise RuntimeError("bad message")
        try:
            await asyncio.sleep(0 if index == 0 else 5)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        return message

    got = []
    with pytest.raises(RuntimeError, match="bad message"):
        async for answer in ordered_concurrent(stream_of(range(5)), handle, max_in_flight=8):
            got.append(answer)
    assert got == [0]
    await asyncio.sleep(0.01)
    assert sorted(cancelled) == [2, 3, 4]


async def test_request_stream_error_surfaces_after_answered_messages():
    async def broken():
        yield 1
        yield 2
        raise ConnectionError("stream broke")

    async def handle(index: int, message: int) -> int:
        return message + 100

    got = []
    with pytest.raises(ConnectionError, match="stream broke"):
        async for answer in ordered_concurrent(broken(), handle):
            got.append(answer)
    assert got == [101, 102]
