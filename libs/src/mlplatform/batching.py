"""Dynamic batching: coalesce concurrent requests into one runtime call.

One batching task per model. A request (`submit`) carries one or more rows; the
first request of a batch waits at most `max_queue_delay` for others, or less when
`max_batch_size` rows are queued. The queue is bounded (`QueueFullError`, i.e.
RESOURCE_EXHAUSTED), requests whose deadline passed while queued are dropped
before inference, and an error in one request fails only that request: when a
batch fails, its requests are retried one by one so each gets its own answer.
Inference runs on a thread pool, off the event loop, except batches whose estimated run time
is under `inline_below_s` (a fraud row: tens of microseconds), which run on the loop: there the
hop to a thread and back would cost more CPU than the runtime call.

Admission control (`mlplatform.admission`): a request whose estimated queue wait plus
inference exceeds the sooner of its deadline and the model's latency budget is refused at
`submit` (RESOURCE_EXHAUSTED with a retry hint), and one that has waited longer than the
budget is refused before inference. The estimate comes from the queue and a running fit of
batch duration against rows (seeded by `calibrate` at start-up, updated by every batch).

Length-aware batching (variable-length inputs such as token sequences): given
`lengths_of` (per-row sequence lengths of a request), a closed batch is cut into
length groups (`mlplatform.batch_shapes.group_by_length`), each run as its own
batch. The batch is still taken oldest-first, so grouping never starves a request.
Real vs padded positions (and what one unsplit batch would have padded) are counted
for Prometheus and `stats`. Fixed batch shapes (`pad_sizes`): each runtime call is
padded up to an allowed size (`batch_shapes.pad_rows`) and the outputs are cut back.
This module is the queue loop; the shape arithmetic is `mlplatform.batch_shapes`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from mlplatform import admission, faults, metrics, runtime_threads
from mlplatform.batch_shapes import concat_inputs, group_by_length, pad_rows
from mlplatform.errors import (
    DeadlineExpiredError,
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    QueueFullError,
    ServingError,
)

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
InferFn = Callable[[Tensors], Mapping[str, np.ndarray]]
LengthsFn = Callable[[Tensors], np.ndarray]


@dataclass(frozen=True)
class BatchTiming:
    """When a request was queued, and when its batch's inference started and ended (ns, wall clock)."""

    enqueued_ns: int
    started_ns: int
    finished_ns: int
    batch_rows: int

    @property
    def queue_wait_s(self) -> float:
        return (self.started_ns - self.enqueued_ns) / 1e9

    @property
    def inference_s(self) -> float:
        return (self.finished_ns - self.started_ns) / 1e9


@dataclass(frozen=True)
class BatchResult:
    """One request's outputs, sliced out of its batch."""

    outputs: Tensors
    timing: BatchTiming


@dataclass
class _Request:
    inputs: Tensors
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued: float  # loop.time()
    enqueued_ns: int
    deadline: float | None  # loop.time()
    budget_deadline: float | None  # loop.time(): enqueued + the latency budget
    lengths: np.ndarray | None = None  # per-row sequence lengths (length-aware batching only)
    taken: float | None = None  # loop.time() it left the queue for a batch
    estimated_wait: float = 0.0  # admission's estimate of its queue wait (s)

    @property
    def length(self) -> int:
        return int(self.lengths.max()) if self.lengths is not None else 0


@dataclass
class BatcherStats:
    """Counters for tests and debugging; the same figures go to Prometheus."""

    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    expired: int = 0
    rejected: int = 0
    """Refused: queue full, or admission control (estimated wait over the time left)."""
    over_budget: int = 0
    """Admitted, but refused before inference after waiting longer than the latency budget."""
    max_queue_wait_s: float = 0.0
    """Longest queue wait of a request that was run."""
    real_positions: int = 0
    """Sequence positions of real tokens in the batches run (length-aware batching)."""
    padded_positions: int = 0
    """Positions computed: each group's rows x its longest member."""
    unsplit_positions: int = 0
    """Positions one batch of everything taken together (FIFO, no grouping) would have computed."""
    padding_rows: int = 0
    """Rows added to reach a size in `pad_sizes`."""


class DynamicBatcher:
    """Queue, coalesce and run requests through `infer` in batches of at most `max_batch_size` rows."""

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        model: str = "model",
        version: str = "1",
        keep_batch_sizes: int = 10_000,
        lengths_of: LengthsFn | None = None,
        group_overhead: int = 256,
        latency_budget_s: float | None = None,
        inline_below_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        if latency_budget_s is not None and latency_budget_s <= 0:
            raise ValueError("latency_budget_s must be > 0 (None: no budget)")
        self.latency_budget_s = latency_budget_s
        """The model's latency budget (its SLO) in seconds; None: only the client's deadline bounds a request."""
        self.inline_below_s = inline_below_s
        """Batches estimated to run in less than this run on the event loop, not the thread pool: for a
        runtime call of tens of microseconds, the hop to a thread and back costs several times the call."""
        self.inline_max_rows = 0
        """Largest batch run on the event loop, from `calibrate` (decided once, on the runtime's own
        timing: live timings grow when other processes take the cores, exactly when CPU is scarcest)."""
        self.wait_correction = admission.WaitCorrection()
        """Learnt ratio of real queue waits to estimated ones (length groups, contended cores)."""
        self.service_time = admission.ServiceTime()
        """Batch run time against rows, for admission estimates."""
        self._busy_until: dict[int, float] = {}  # running batch id -> estimated end (loop.time())
        self._infer = infer
        self._lengths_of = lengths_of
        self.group_overhead = group_overhead
        self.pad_sizes: list[int] = []
        """Allowed batch sizes to pad each runtime call up to (ascending); empty: no padding."""
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._max_concurrent = max_concurrent_batches
        self._executor = runtime_threads.runtime_executor(max_concurrent_batches, f"infer-{model}")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._labels = {"model": model, "version": version}
        # Labelled children resolved once: `labels()` is a dict lookup under a lock on every call.
        self._m_queue_depth = metrics.QUEUE_DEPTH.labels(**self._labels)
        self._m_queue_wait = metrics.QUEUE_WAIT.labels(**self._labels)
        self._m_batch_size = metrics.BATCH_SIZE.labels(**self._labels)
        self._m_inference = metrics.INFERENCE_TIME.labels(**self._labels)
        self._m_padding = metrics.PADDING_ROWS.labels(**self._labels)
        self._m_rejected = {reason: metrics.REJECTED.labels(**self._labels, reason=reason)
                            for reason in ("queue_full", "overload", "over_budget", "deadline")}
        self._m_positions = {kind: metrics.BATCH_POSITIONS.labels(**self._labels, kind=kind)
                             for kind in ("real", "padded", "unsplit")}
        self._keep = keep_batch_sizes
        self.stats = BatcherStats()

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the batching task on the running loop."""
        if self.running:
            return
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self._max_concurrent)
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self._labels['model']}")

    async def stop(self) -> None:
        """Stop batching: wait for batches in the runtime, fail requests still queued."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            req = self._pop()
            if not req.future.done():
                req.future.set_exception(ModelNotReadyError("the model is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: Tensors, *, timeout_s: float | None = None) -> BatchResult:
        """Queue one request of N rows; return its outputs when its batch has run.

        `timeout_s` is the time the caller has left (e.g. the gRPC deadline); a request
        still queued when it runs out is dropped with DeadlineExpiredError.
        """
        if not self.running or self._arrived is None:
            raise ModelNotReadyError("the batcher is not running")
        rows = _rows_of(inputs)
        if rows > self.max_batch_size:
            raise InvalidInputError(f"request has {rows} rows; at most {self.max_batch_size} per request")
        est = self.admit(rows, timeout_s)
        loop = asyncio.get_running_loop()
        now = loop.time()
        lengths = None
        if self._lengths_of is not None:
            lengths = np.asarray(self._lengths_of(inputs), dtype=np.int64)
            if lengths.shape != (rows,):
                raise InvalidInputError(f"sequence lengths {list(lengths.shape)} do not match {rows} rows")
        req = _Request(
            inputs=inputs, rows=rows, future=loop.create_future(), enqueued=now, enqueued_ns=time.time_ns(),
            deadline=None if timeout_s is None else now + timeout_s,
            budget_deadline=None if self.latency_budget_s is None else now + self.latency_budget_s, lengths=lengths,
            estimated_wait=est.wait_s,
        )
        self._queue.append(req)
        self._queued_rows += rows
        self._m_queue_depth.set(len(self._queue))
        self._arrived.set()
        return await req.future

    def admit(self, rows: int, timeout_s: float | None) -> admission.Estimate:
        """Refuse (raise) a request of `rows` rows arriving now that could not finish in time, or whose queue
        is full; return if it is admitted. Cheap: the data plane also calls it before parsing a request, so
        an overloaded model refuses before spending CPU on it (tokenising, decoding). Returns the estimate.
        """
        if not self.running:
            raise ModelNotReadyError("the batcher is not running")
        now = asyncio.get_running_loop().time()
        est = admission.estimate(self._queue_state(now), self.service_time, rows)
        if len(self._queue) >= self.max_queue_size:
            self.stats.rejected += 1
            self._m_rejected["queue_full"].inc()
            raise QueueFullError(f"queue is full ({self.max_queue_size} requests waiting); retry later",
                                 retry_after_s=admission.retry_after_s(est.wait_s))
        left = admission.time_left(now, None if timeout_s is None else now + timeout_s, self.latency_budget_s)
        refusal = admission.check(self._labels["model"], est, left, self.latency_budget_s,
                                  headroom=admission.HEADROOM * self.wait_correction.factor(now))
        if refusal is not None:
            self.stats.rejected += 1
            self._m_rejected["overload"].inc()
            raise refusal
        return est

    def _queue_state(self, now: float) -> admission.QueueState:
        """The queue and the runtime as admission sees them at `now`."""
        slot_free_in = 0.0
        if len(self._busy_until) >= self._max_concurrent:
            slot_free_in = max(0.0, min(self._busy_until.values()) - now)
        return admission.QueueState(self._queued_rows, slot_free_in, self.max_batch_size, self._max_concurrent)

    async def calibrate(self, samples: list[Tensors], repeats: int = 3) -> None:
        """Time the runtime on `samples` (e.g. warm-up batches of 1 and max_batch_size rows) to seed the
        service-time fit before the first request; the median of `repeats` calls per sample.

        The admission prior takes the round trip through the worker thread (what a batch costs the
        queue); the inline decision takes the runtime's own time, measured inside the thread, so a slow
        thread wake-up on a busy machine cannot push a microsecond model off the event loop."""
        loop = asyncio.get_running_loop()
        runtime_only = admission.ServiceTime()

        def timed(inputs: Tensors, rows: int) -> float:
            t0 = time.perf_counter()
            self._run_checked(inputs, rows)
            return time.perf_counter() - t0

        for inputs in samples:
            rows = _rows_of(inputs)
            trips, runs = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runs.append(await loop.run_in_executor(self._executor, timed, inputs, rows))
                trips.append(time.perf_counter() - t0)
            self.service_time.add_prior(rows, sorted(trips)[len(trips) // 2])
            runtime_only.add_prior(rows, sorted(runs)[len(runs) // 2])
        fixed, per_row = runtime_only.coefficients()
        self.inline_max_rows = 0
        if self.inline_below_s > 0 and fixed < self.inline_below_s:
            fits = int((self.inline_below_s - fixed) / per_row) if per_row > 0 else self.max_batch_size
            self.inline_max_rows = min(self.max_batch_size, fits)
        log.info("%s v%s: batch time ~ %.2f ms + %.3f ms/row (calibrated); batches of up to %d rows run on "
                 "the event loop", self._labels["model"], self._labels["version"], fixed * 1000, per_row * 1000,
                 self.inline_max_rows)

    # -- batching task ---------------------------------------------------------------

    def _pop(self) -> _Request:
        req = self._queue.popleft()
        self._queued_rows -= req.rows
        return req

    async def _loop(self) -> None:
        assert self._arrived is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            close_at = self._queue[0].enqueued + self.max_queue_delay_s
            while self._queued_rows < self.max_batch_size:
                remaining = close_at - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            await self._slots.acquire()
            batch = self._take(loop.time())
            if not batch:
                self._slots.release()
                continue
            for n, group in enumerate(self._groups(batch)):
                if n:  # the first group uses the slot acquired above
                    await self._slots.acquire()
                rows = sum(r.rows for r in group)
                if self._inline(rows):  # cheaper than the thread hop: run it here, no task either
                    await self._execute(group, inline=True)
                    continue
                task = asyncio.create_task(self._execute(group))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    def _inline(self, rows: int) -> bool:
        """Run a batch of `rows` on the event loop: at start-up, it took less than `inline_below_s`."""
        return rows <= self.inline_max_rows

    def _groups(self, batch: list[_Request]) -> list[list[_Request]]:
        """The runtime calls for one taken batch: itself, or length groups (counting positions)."""
        if self._lengths_of is None:
            return [batch]
        sizes = [(r.rows, r.length) for r in batch]
        groups = [[batch[i] for i in g] for g in group_by_length(sizes, self.group_overhead)]
        real = sum(int(r.lengths.sum()) for r in batch if r.lengths is not None)
        padded = sum(sum(r.rows for r in g) * max(r.length for r in g) for g in groups)
        unsplit = sum(r.rows for r in batch) * max(r.length for r in batch)
        for kind, value in (("real", real), ("padded", padded), ("unsplit", unsplit)):
            self._m_positions[kind].inc(value)
        self.stats.real_positions += real
        self.stats.padded_positions += padded
        self.stats.unsplit_positions += unsplit
        return groups

    def _take(self, now: float) -> list[_Request]:
        """Pop requests up to max_batch_size rows, dropping expired and cancelled ones."""
        batch: list[_Request] = []
        rows = 0
        while self._queue:
            req = self._queue[0]
            if req.future.done():  # the caller went away (cancelled)
                self._pop()
                continue
            if req.deadline is not None and req.deadline <= now:
                self._pop()
                self.stats.expired += 1
                self._m_rejected["deadline"].inc()
                req.future.set_exception(DeadlineExpiredError("deadline passed while the request was queued"))
                continue
            if req.budget_deadline is not None and req.budget_deadline < now:
                self.wait_correction.observe(req.estimated_wait, now - req.enqueued, now)
                self._pop()
                self.stats.over_budget += 1
                self._m_rejected["over_budget"].inc()
                assert self.latency_budget_s is not None
                req.future.set_exception(admission.budget_exceeded(
                    self._labels["model"], now - req.enqueued, self.latency_budget_s))
                continue
            if rows + req.rows > self.max_batch_size:
                break
            req.taken = now
            self.wait_correction.observe(req.estimated_wait, now - req.enqueued, now)
            batch.append(self._pop())
            rows += req.rows
        self._m_queue_depth.set(len(self._queue))
        return batch

    async def _execute(self, batch: list[_Request], inline: bool = False) -> None:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        rows = sum(r.rows for r in batch)
        started_ns = time.time_ns()
        now = loop.time()
        for req in batch:
            waited = (req.taken or now) - req.enqueued  # queue wait ends when the batch takes it
            self._m_queue_wait.observe(waited)
            if waited > self.stats.max_queue_wait_s:
                self.stats.max_queue_wait_s = waited
        key = id(batch)
        self._busy_until[key] = now + self.service_time.predict(rows)
        self.stats.batches += 1
        if len(self.stats.batch_sizes) < self._keep:
            self.stats.batch_sizes.append(rows)
        self._m_batch_size.observe(rows)
        try:
            inputs = batch[0].inputs if len(batch) == 1 else concat_inputs([r.inputs for r in batch])
            if inline:
                outputs = self._run_checked(inputs, rows)
            else:
                outputs = await loop.run_in_executor(self._executor, self._run_checked, inputs, rows)
        except Exception as exc:  # isolate the bad request(s): run each on its own
            if len(batch) > 1:
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(batch), exc)
                await self._execute_singly(batch, started_ns)
            else:
                _fail(batch[0], exc)
            self._busy_until.pop(key, None)
            self._slots.release()
            return
        finished_ns = time.time_ns()
        self._busy_until.pop(key, None)
        self._slots.release()
        self.service_time.observe(rows, (finished_ns - started_ns) / 1e9)
        self._m_inference.observe((finished_ns - started_ns) / 1e9)
        offset = 0
        for req in batch:
            part = {k: v[offset:offset + req.rows] for k, v in outputs.items()}
            offset += req.rows
            if not req.future.done():
                req.future.set_result(BatchResult(part, BatchTiming(req.enqueued_ns, started_ns, finished_ns, rows)))

    async def _execute_singly(self, batch: list[_Request], started_ns: int) -> None:
        loop = asyncio.get_running_loop()
        for req in batch:
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_checked, req.inputs, req.rows)
            except Exception as exc:
                _fail(req, exc)
                continue
            if not req.future.done():
                timing = BatchTiming(req.enqueued_ns, started_ns, time.time_ns(), req.rows)
                req.future.set_result(BatchResult(outputs, timing))

    def _run_checked(self, inputs: Tensors, rows: int) -> Tensors:
        padded = pad_rows(inputs, rows, self.pad_sizes) if self.pad_sizes else inputs
        run_rows = next(iter(padded.values())).shape[0]
        if run_rows > rows:
            self.stats.padding_rows += run_rows - rows
            self._m_padding.inc(run_rows - rows)
        outputs = dict(faults.run(self._labels["model"], self._infer, padded))  # MLPLATFORM_FAULTS: off by default
        for name, value in outputs.items():
            if value.shape[:1] != (run_rows,):
                raise InferenceError(f"runtime returned output {name!r} with shape {value.shape} for {run_rows} rows")
        if run_rows > rows:
            outputs = {name: value[:rows] for name, value in outputs.items()}
        return outputs


def _rows_of(inputs: Mapping[str, np.ndarray]) -> int:
    if not inputs:
        raise InvalidInputError("request has no input tensors")
    sizes = {name: (v.shape[0] if v.ndim else -1) for name, v in inputs.items()}
    distinct = set(sizes.values())
    if len(distinct) != 1 or -1 in distinct:
        raise InvalidInputError(f"inputs disagree on the batch dimension: {sizes}")
    rows = distinct.pop()
    if rows < 1:
        raise InvalidInputError("request has 0 rows")
    return rows


def _fail(req: _Request, exc: BaseException) -> None:
    if req.future.done():
        return
    if isinstance(exc, ServingError):
        req.future.set_exception(exc)
    else:
        req.future.set_exception(InferenceError(f"inference failed: {type(exc).__name__}: {exc}"))
