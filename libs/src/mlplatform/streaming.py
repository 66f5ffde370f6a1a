"""Bidirectional streams whose messages are handled concurrently but answered in order.

Each incoming message becomes a task at once (so streamed messages share batches
with each other and with unary calls); responses are yielded in request order.
At most `max_in_flight` messages are pending: reading pauses beyond that, which
gives the stream HTTP/2 back-pressure instead of unbounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def ordered_concurrent(
    requests: AsyncIterator[Req],
    handle: Callable[[int, Req], Awaitable[Resp]],
    *,
    max_in_flight: int = 64,
) -> AsyncIterator[Resp]:
    """Yield `handle(index, message)` for each message, in order, running up to `max_in_flight` at once.

    `handle` must turn its own failures into a response (a stream must not die of one
    bad message); an exception escaping it ends the stream.
    """
    # The one bound: handlers started and not yet answered. (A bounded queue alone would let two
    # more run: the one being awaited below and the one the reader holds while `put` waits.)
    slots = asyncio.Semaphore(max_in_flight)
    pending: asyncio.Queue[asyncio.Task[Resp] | None] = asyncio.Queue()

    async def reader() -> None:
        index = 0
        try:
            async for message in requests:
                await slots.acquire()
                await pending.put(asyncio.ensure_future(handle(index, message)))
                index += 1
        finally:
            await pending.put(None)

    reader_task = asyncio.create_task(reader())
    try:
        while (task := await pending.get()) is not None:
            try:
                response = await task
            finally:
                slots.release()
            yield response
        await reader_task  # surface a reader error (e.g. a broken stream)
    finally:
        reader_task.cancel()
        while not pending.empty():
            task = pending.get_nowait()
            if task is not None:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader_task
