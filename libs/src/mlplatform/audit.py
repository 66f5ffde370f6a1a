"""Write-behind: writes that must never hold a request (feature updates, the prediction audit log).

`WriteBehind.submit` puts an item in a bounded in-memory buffer and returns at once; one background task
takes up to `max_batch` items at a time and hands them to `write` (e.g. one Redis pipeline). When the buffer
is full the item is dropped and counted (`write_behind_dropped_total`): latency is never traded for the log.
A failed write is logged and counted, never retried (the buffer would grow behind a dead backend).
Each item may carry its request's trace context: its flush is then an `audit.write` span of that trace.

`AuditLog` appends predictions to a Redis stream (`XADD ... MAXLEN ~ N`); read it back with
`XRANGE <stream> - +` or follow it with `XREAD BLOCK 0 STREAMS <stream> $` (README "Fraud audit log").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge

from mlplatform import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITTEN = Counter("write_behind_written_total", "Items written by a write-behind buffer", ["buffer"])
DROPPED = Counter("write_behind_dropped_total", "Items dropped because the write-behind buffer was full",
                  ["buffer"])
FAILED = Counter("write_behind_failed_total", "Items whose write failed (backend down or slow)", ["buffer"])
DEPTH = Gauge("write_behind_depth", "Items waiting in a write-behind buffer", ["buffer"])


@dataclass(frozen=True)
class _Entry(Generic[T]):
    item: T
    context: Any  # the submitting request's OpenTelemetry context (None when tracing is off)


class WriteBehind(Generic[T]):
    """A bounded buffer drained by one task into `write(items)`; `submit` never waits."""

    def __init__(self, name: str, write: Callable[[Sequence[T]], Awaitable[None]], *, max_items: int = 10_000,
                 max_batch: int = 256, timeout_s: float = 1.0) -> None:
        self.name = name
        self.write = write
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[_Entry[T]] = asyncio.Queue(max_items)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._dropped = DROPPED.labels(name)
        self._depth = DEPTH.labels(name)

    def start(self) -> WriteBehind[T]:
        """Start the draining task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain_forever(), name=f"write-behind-{self.name}")
        return self

    def submit(self, item: T) -> bool:
        """Buffer `item` for writing; False (dropped, counted) when the buffer is full."""
        context = None
        if tracing.enabled():
            from opentelemetry import context as otel_context

            context = otel_context.get_current()
        try:
            self._queue.put_nowait(_Entry(item, context))
        except asyncio.QueueFull:
            self.dropped += 1
            self._dropped.inc()
            return False
        self._depth.set(self._queue.qsize())
        return True

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def _drain_forever(self) -> None:
        while True:
            entries = [await self._queue.get()]
            while len(entries) < self.max_batch and not self._queue.empty():
                entries.append(self._queue.get_nowait())
            self._depth.set(self._queue.qsize())
            try:
                await self._flush(entries)
            finally:
                for _ in entries:
                    self._queue.task_done()

    async def _flush(self, entries: list[_Entry[T]]) -> None:
        spans = _start_spans(entries, self.name)
        try:
            await asyncio.wait_for(self.write([e.item for e in entries]), self.timeout_s)
        except Exception as exc:
            self.failed += len(entries)
            FAILED.labels(self.name).inc(len(entries))
            log.warning("write-behind %s: %d items not written (%s: %s)", self.name, len(entries),
                        type(exc).__name__, exc)
            for s in spans:
                s.set_attribute("write.error", type(exc).__name__)
        else:
            self.written += len(entries)
            WRITTEN.labels(self.name).inc(len(entries))
        finally:
            for s in spans:
                s.end()

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything submitted so far is written (at shutdown, in tests), at most `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Flush (bounded), then stop the task."""
        await self.flush(timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _start_spans(entries: Sequence[_Entry[Any]], name: str) -> list[Any]:
    """One `audit.write` span per traced item, child of its request's span, covering the batch's write."""
    traced = [e.context for e in entries if e.context is not None]
    if not traced:
        return []
    return [tracing.tracer().start_span("audit.write", context=ctx,
                                        attributes={"write_behind.buffer": name, "write_behind.batch": len(entries)})
            for ctx in traced]


class AuditLog:
    """Prediction records appended to a Redis stream, capped at about `max_len` entries."""

    def __init__(self, client: Any, stream: str, max_len: int = 1_000_000) -> None:
        self.client = client
        self.stream = stream
        self.max_len = max_len

    def append(self, pipe: Any, record: Mapping[str, str | int | float]) -> None:
        """Queue `XADD stream MAXLEN ~ max_len * record` on `pipe`."""
        pipe.xadd(self.stream, {k: str(v) for k, v in record.items()}, maxlen=self.max_len, approximate=True)

    async def read(self, count: int = 100, start: str = "-") -> list[tuple[str, dict[str, str]]]:
        """Up to `count` records from `start` (XRANGE), oldest first: (entry id, fields)."""
        entries = await self.client.xrange(self.stream, min=start, max="+", count=count)
        return [(eid.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for eid, fields in entries]
