"""mlplatform.batching.DynamicBatcher: coalescing, limits, deadlines, isolation of failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from mlplatform.batch_shapes import group_by_length, pad_rows
from mlplatform.batching import BatchResult, DynamicBatcher
from mlplatform.errors import (
    DeadlineExpiredError,
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    QueueFullError,
)
from tests.libs.helpers import RecordingInfer, request, wait_until


@pytest.fixture
async def make_batcher():
    """Build and start batchers; stop them (and open their infer gates) at teardown."""
    created: list[tuple[DynamicBatcher, object]] = []

    async def make(infer, **kwargs) -> DynamicBatcher:
        options = {"max_batch_size": 16, "max_queue_delay_s": 0.02, "max_queue_size": 256} | kwargs
        batcher = DynamicBatcher(infer, **options)
        await batcher.start()
        created.append((batcher, infer))
        return batcher

    yield make
    for batcher, infer in created:
        gate = getattr(infer, "gate", None)
        if gate is not None:
            gate.set()
        await batcher.stop()


def expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return inputs["x"] * 2 + 1


async def block_single_slot(batcher: DynamicBatcher, infer: RecordingInfer) -> asyncio.Task[BatchResult]:
    """Submit a request whose batch blocks in `infer` (until the gate opens), holding the only slot."""
    blocker = asyncio.create_task(batcher.submit(request(-1)))
    await asyncio.to_thread(infer.entered.wait, 5)
    assert infer.entered.is_set(), "the blocking batch never reached infer"
    return blocker


def test_constructor_rejects_bad_limits():
    infer = RecordingInfer()
    with pytest.raises(ValueError):
        DynamicBatcher(infer, max_batch_size=0, max_queue_delay_s=0.01, max_queue_size=1)
    with pytest.raises(ValueError):
        DynamicBatcher(infer, max_batch_size=1, max_queue_delay_s=0.01, max_queue_size=0)
    with pytest.raises(ValueError):
        DynamicBatcher(infer, max_batch_size=1, max_queue_delay_s=-1, max_queue_size=1)


async def test_submit_before_start_is_model_not_ready():
    infer = RecordingInfer()
    batcher = DynamicBatcher(infer, max_batch_size=4, max_queue_delay_s=0.01, max_queue_size=4)
    try:
        with pytest.raises(ModelNotReadyError) as err:
            await batcher.submit(request(1))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert not batcher.running
        assert infer.calls == []
    finally:
        await batcher.stop()


async def test_lone_request_is_served_after_the_queue_delay(make_batcher):
    delay = 0.05
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=16, max_queue_delay_s=delay)
    inputs = request(7, rows=3)

    t0 = time.monotonic()
    result = await batcher.submit(inputs)
    elapsed = time.monotonic() - t0

    np.testing.assert_array_equal(result.outputs["y"], expected(inputs))
    assert elapsed < delay + 0.5
    # a partial batch waits for company, but not (much) beyond max_queue_delay
    assert result.timing.queue_wait_s >= delay * 0.8
    assert result.timing.batch_rows == 3
    assert result.timing.inference_s >= 0
    assert batcher.stats.batch_sizes == [3]
    assert batcher.stats.batches == 1
    assert batcher.queue_depth == 0


async def test_full_batch_does_not_wait_for_the_queue_delay(make_batcher):
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=4, max_queue_delay_s=5.0)
    inputs = request(1, rows=4)

    t0 = time.monotonic()
    result = await batcher.submit(inputs)

    assert time.monotonic() - t0 < 2.5  # far below the 5 s delay: a full batch runs at once
    np.testing.assert_array_equal(result.outputs["y"], expected(inputs))
    assert batcher.stats.batch_sizes == [4]


async def test_concurrent_requests_are_coalesced_and_routed_back(make_batcher):
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=16, max_queue_delay_s=0.02)
    requests = [request(i) for i in range(64)]

    results = await asyncio.gather(*(batcher.submit(r) for r in requests))

    sizes = batcher.stats.batch_sizes
    assert sum(sizes) == 64
    assert max(sizes) <= 16
    assert max(sizes) > 1, f"no coalescing happened: {sizes}"
    assert len(sizes) < 64
    assert batcher.stats.batches == len(sizes)
    # the runtime saw exactly the batches the stats report, never more than 16 rows
    assert [len(c) for c in infer.calls] == sizes
    assert all(len(c) <= 16 for c in infer.calls)
    assert sorted(infer.rows_seen[:, 0].tolist()) == list(range(64))
    # each caller got the outputs of its own row
    for inputs, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], expected(inputs))
        assert result.timing.batch_rows in sizes


async def test_multi_row_requests_are_never_split(make_batcher):
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=8, max_queue_delay_s=0.02)
    row_counts = [3, 5, 2, 7, 1, 8, 4, 6, 2, 3, 5, 1, 7, 8, 2, 4]
    requests = [request(i, rows=n) for i, n in enumerate(row_counts)]

    results = await asyncio.gather(*(batcher.submit(r) for r in requests))

    assert all(size <= 8 for size in batcher.stats.batch_sizes)
    assert sum(batcher.stats.batch_sizes) == sum(row_counts)
    assert [len(c) for c in infer.calls] == batcher.stats.batch_sizes
    seen_in: dict[int, int] = {}
    for call_no, batch in enumerate(infer.calls):
        assert len(batch) <= 8
        for req_id, n in Counter(batch[:, 0].astype(int).tolist()).items():
            assert n == row_counts[req_id], f"request {req_id} was split: {n} of {row_counts[req_id]} rows"
            assert req_id not in seen_in, f"request {req_id} ran twice"
            seen_in[req_id] = call_no
    assert sorted(seen_in) == list(range(len(row_counts)))
    for inputs, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], expected(inputs))


async def test_request_above_max_batch_size_is_refused(make_batcher):
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=4)

    with pytest.raises(InvalidInputError) as err:
        await batcher.submit(request(1, rows=5))

    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "5 rows" in err.value.message and "4" in err.value.message
    assert batcher.queue_depth == 0
    # the batcher still works and never saw the refused rows
    ok = await batcher.submit(request(2, rows=4))
    np.testing.assert_array_equal(ok.outputs["y"], expected(request(2, rows=4)))
    assert infer.ids_seen() == {2.0}


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"x": np.zeros((0, 2))},
        {"x": np.zeros((2, 2)), "z": np.zeros((3, 2))},
        {"x": np.float64(1.0) * np.ones(())},
    ],
    ids=["no-tensors", "zero-rows", "disagreeing-batch-dims", "scalar"],
)
async def test_malformed_requests_are_invalid_input(make_batcher, inputs):
    infer = RecordingInfer()
    batcher = await make_batcher(infer)
    with pytest.raises(InvalidInputError):
        await batcher.submit(inputs)
    assert batcher.queue_depth == 0
    assert infer.calls == []


async def test_expired_requests_are_dropped_before_inference(make_batcher):
    gate = threading.Event()
    infer = RecordingInfer(gate=gate)
    batcher = await make_batcher(infer, max_batch_size=16, max_queue_delay_s=0.005, max_concurrent_batches=1)
    blocker = await block_single_slot(batcher, infer)

    expiring = [asyncio.create_task(batcher.submit(request(100 + i), timeout_s=0.05)) for i in range(3)]
    patient = asyncio.create_task(batcher.submit(request(200), timeout_s=30))
    no_deadline = asyncio.create_task(batcher.submit(request(300)))
    await asyncio.sleep(0.2)  # the short deadlines pass while the slot is busy
    assert batcher.queue_depth == 5
    gate.set()

    for task in expiring:
        with pytest.raises(DeadlineExpiredError) as err:
            await task
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    np.testing.assert_array_equal((await patient).outputs["y"], expected(request(200)))
    np.testing.assert_array_equal((await no_deadline).outputs["y"], expected(request(300)))
    np.testing.assert_array_equal((await blocker).outputs["y"], expected(request(-1)))
    assert infer.ids_seen() == {-1.0, 200.0, 300.0}  # never the expired rows
    assert batcher.stats.expired == 3
    assert batcher.stats.batch_sizes == [1, 2]


async def test_queue_full_is_resource_exhausted_and_bounded(make_batcher):
    gate = threading.Event()
    infer = RecordingInfer(gate=gate)
    labels = {"model": "queue-full-test", "version": "3"}
    batcher = await make_batcher(infer, max_batch_size=16, max_queue_size=4, model=labels["model"],
                                 version=labels["version"])
    blocker = await block_single_slot(batcher, infer)
    rejected_before = REGISTRY.get_sample_value("inference_rejected_total", {**labels, "reason": "queue_full"}) or 0

    tasks = [asyncio.create_task(batcher.submit(request(i))) for i in range(10)]
    depths = []
    for _ in range(20):
        await asyncio.sleep(0.005)
        depths.append(batcher.queue_depth)
    assert max(depths) == 4
    done = [t for t in tasks if t.done()]
    assert len(done) == 6
    for task in done:
        err = task.exception()
        assert isinstance(err, QueueFullError)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert batcher.stats.rejected == 6
    rejected_after = REGISTRY.get_sample_value("inference_rejected_total", {**labels, "reason": "queue_full"})
    assert rejected_after - rejected_before == 6

    gate.set()
    await blocker
    accepted = [t for t in tasks if t not in done]
    results = await asyncio.gather(*accepted)
    assert [r.outputs["y"][0, 0] for r in results] == [i * 2 + 1 for i in range(4)]  # the first four got in
    assert batcher.queue_depth == 0
    # once drained, the queue accepts requests again
    again = await batcher.submit(request(42))
    np.testing.assert_array_equal(again.outputs["y"], expected(request(42)))


async def test_failing_request_does_not_fail_its_batch_mates(make_batcher):
    infer = RecordingInfer(fail_on_nan=True)
    batcher = await make_batcher(infer, max_batch_size=16, max_queue_delay_s=0.05)
    requests = [request(i, rows=2) for i in range(6)]
    requests[3]["x"][1, 1] = np.nan

    results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)

    bad = results[3]
    assert isinstance(bad, InferenceError)
    assert bad.code == grpc.StatusCode.INTERNAL
    assert "ValueError" in bad.message and "NaN" in bad.message
    for i, result in enumerate(results):
        if i != 3:
            assert isinstance(result, BatchResult), result
            np.testing.assert_array_equal(result.outputs["y"], expected(requests[i]))
    # one batch of 12 rows failed; then each request ran on its own
    assert batcher.stats.batch_sizes == [12]
    assert [len(c) for c in infer.calls] == [12, 2, 2, 2, 2, 2, 2]
    assert [c[0, 0] for c in infer.calls[1:]] == [0, 1, 2, 3, 4, 5]


async def test_lone_failing_request_gets_inference_error(make_batcher):
    infer = RecordingInfer(fail_on_nan=True)
    batcher = await make_batcher(infer, max_queue_delay_s=0.001)
    inputs = request(1)
    inputs["x"][0, 1] = np.nan
    with pytest.raises(InferenceError, match="NaN"):
        await batcher.submit(inputs)
    assert len(infer.calls) == 1  # no retry of a batch of one
    # the batcher survives the failure
    np.testing.assert_array_equal((await batcher.submit(request(2))).outputs["y"], expected(request(2)))


async def test_runtime_output_with_wrong_row_count_is_inference_error(make_batcher):
    batcher = await make_batcher(lambda inputs: {"y": np.zeros((1, 2))}, max_queue_delay_s=0.001)
    with pytest.raises(InferenceError, match=r"'y' with shape \(1, 2\) for 3 rows"):
        await batcher.submit(request(1, rows=3))


async def test_cancelled_request_is_skipped(make_batcher):
    gate = threading.Event()
    infer = RecordingInfer(gate=gate)
    batcher = await make_batcher(infer, max_concurrent_batches=1, max_queue_delay_s=0.005)
    blocker = await block_single_slot(batcher, infer)

    gone = asyncio.create_task(batcher.submit(request(50)))
    stays = asyncio.create_task(batcher.submit(request(60)))
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 2
    gone.cancel()
    gate.set()

    np.testing.assert_array_equal((await stays).outputs["y"], expected(request(60)))
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert infer.ids_seen() == {-1.0, 60.0}
    assert batcher.stats.batch_sizes == [1, 1]
    assert batcher.queue_depth == 0


async def test_batches_run_concurrently_up_to_max_concurrent_batches(make_batcher):
    both_in = threading.Barrier(2, timeout=5)

    def infer(inputs):
        both_in.wait()  # raises BrokenBarrierError unless two batches are in the runtime at once
        return {"y": inputs["x"] * 2 + 1}

    batcher = await make_batcher(infer, max_batch_size=2, max_queue_delay_s=0.001, max_concurrent_batches=2)
    a, b = request(1, rows=2), request(2, rows=2)
    ra, rb = await asyncio.gather(batcher.submit(a), batcher.submit(b))
    np.testing.assert_array_equal(ra.outputs["y"], expected(a))
    np.testing.assert_array_equal(rb.outputs["y"], expected(b))
    assert batcher.stats.batch_sizes == [2, 2]


async def test_stop_fails_queued_requests_and_finishes_running_ones():
    gate = threading.Event()
    infer = RecordingInfer(gate=gate)
    batcher = DynamicBatcher(infer, max_batch_size=16, max_queue_delay_s=0.005, max_queue_size=16)
    await batcher.start()
    try:
        blocker = await block_single_slot(batcher, infer)
        queued = [asyncio.create_task(batcher.submit(request(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 3

        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waits for the batch in the runtime
        gate.set()
        await asyncio.wait_for(stopping, 10)

        np.testing.assert_array_equal((await blocker).outputs["y"], expected(request(-1)))
        for task in queued:
            with pytest.raises(ModelNotReadyError, match="shutting down"):
                await task
        assert batcher.queue_depth == 0
        assert not batcher.running
        assert infer.ids_seen() == {-1.0}
        with pytest.raises(ModelNotReadyError):
            await batcher.submit(request(9))
    finally:
        gate.set()
        await batcher.stop()


async def test_metrics_follow_batches(make_batcher):
    labels = {"model": "metrics-test", "version": "1"}
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=4, max_queue_delay_s=0.02, **labels)
    await asyncio.gather(*(batcher.submit(request(i)) for i in range(8)))
    await wait_until(lambda: batcher.stats.batches == 2)
    assert REGISTRY.get_sample_value("inference_batch_size_count", labels) == 2
    assert REGISTRY.get_sample_value("inference_batch_size_sum", labels) == 8
    assert REGISTRY.get_sample_value("inference_queue_wait_seconds_count", labels) == 8
    assert REGISTRY.get_sample_value("inference_queue_depth", labels) == 0


# -- length-aware batching ------------------------------------------------------------------


def test_group_by_length_cuts_where_padding_costs_more_than_a_call():
    # (rows, length): two short and two long requests, interleaved.
    sizes = [(1, 10), (1, 120), (1, 12), (1, 118)]
    assert group_by_length(sizes, overhead=50) == [[0, 2], [3, 1]]
    # A call costing more than the padding saved keeps one group (sorted by length).
    assert group_by_length(sizes, overhead=10_000) == [[0, 2, 3, 1]]
    # Equal lengths share a call; rows weigh in.
    assert group_by_length([(3, 5), (1, 5), (2, 9)], overhead=1) == [[0, 1], [2]]
    assert group_by_length([], overhead=5) == []


async def test_length_aware_batches_group_short_and_long_requests(make_batcher):
    gate = threading.Event()
    infer = RecordingInfer(gate=gate)
    batcher = await make_batcher(infer, max_batch_size=16, lengths_of=lambda inputs: inputs["x"][:, 1].astype(int),
                                 group_overhead=20)
    blocker = await block_single_slot(batcher, infer)
    lengths = [5, 100, 6, 98, 5, 97, 7, 100]  # interleaved short and long requests
    tasks = [asyncio.create_task(batcher.submit({"x": np.array([[i, n]], dtype=np.float64)}))
             for i, n in enumerate(lengths)]
    await wait_until(lambda: batcher.queue_depth == len(lengths))
    gate.set()
    results = await asyncio.gather(*tasks)
    await blocker
    for i, result in enumerate(results):  # each request still gets its own answer
        assert result.outputs["y"][0, 0] == i * 2 + 1
    groups = [sorted(call[:, 1].tolist()) for call in infer.calls[1:]]
    assert groups == [[5, 5, 6, 7], [97, 98, 100, 100]]
    stats = batcher.stats
    # The blocking request (length 0) adds nothing.
    assert stats.real_positions == sum(lengths)
    assert stats.padded_positions == 4 * 7 + 4 * 100
    assert stats.unsplit_positions == 8 * 100
    assert stats.padded_positions < stats.unsplit_positions


async def test_length_aware_batching_rejects_lengths_that_do_not_match_the_rows(make_batcher):
    batcher = await make_batcher(RecordingInfer(), lengths_of=lambda inputs: np.array([1, 2, 3]))
    with pytest.raises(InvalidInputError, match="sequence lengths"):
        await batcher.submit({"x": np.zeros((2, 2))})


def test_pad_rows_repeats_the_last_row_up_to_the_smallest_size_that_holds_the_batch():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = pad_rows({"x": x}, 3, [8, 16, 32])
    assert padded["x"].shape == (8, 2)
    np.testing.assert_array_equal(padded["x"][:3], x)
    np.testing.assert_array_equal(padded["x"][3:], np.tile(x[-1], (5, 1)))
    assert pad_rows({"x": x}, 3, [2, 3])["x"] is x  # already an allowed size
    assert pad_rows({"x": x}, 3, [1, 2])["x"] is x  # over every size: as is


async def test_padded_batches_reach_the_runtime_at_allowed_sizes_and_answer_only_real_rows(make_batcher):
    infer = RecordingInfer()
    batcher = await make_batcher(infer, max_batch_size=16, max_queue_delay_s=0.02)
    batcher.pad_sizes = [4, 8, 16]
    requests = [request(i) for i in range(23)]

    results = await asyncio.gather(*(batcher.submit(r) for r in requests))

    assert {len(c) for c in infer.calls} <= {4, 8, 16}, [len(c) for c in infer.calls]
    real = sum(batcher.stats.batch_sizes)
    assert real == 23
    assert batcher.stats.padding_rows == sum(len(c) for c in infer.calls) - 23 > 0
    for inputs, result in zip(requests, results, strict=True):  # padding rows never reach a caller
        assert result.outputs["y"].shape == inputs["x"].shape
        np.testing.assert_array_equal(result.outputs["y"], expected(inputs))
    assert REGISTRY.get_sample_value("inference_batch_padding_rows_total",
                                     {"model": "model", "version": "1"}) >= batcher.stats.padding_rows


async def test_cheap_batches_run_on_the_event_loop_and_costly_ones_on_a_thread():
    """`inline_below_s`: calibration decides which batch sizes skip the thread hop."""
    threads: list[str] = []

    def infer(inputs):
        threads.append(threading.current_thread().name)
        time.sleep(0.004 * len(inputs["x"]) if slow else 0)
        return {"y": inputs["x"] * 2}

    for slow in (False, True):
        threads.clear()
        b = DynamicBatcher(infer, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=100,
                           inline_below_s=0.002)
        await b.calibrate([{"x": np.ones((1, 1), np.float32)}, {"x": np.ones((8, 1), np.float32)}])
        await b.start()
        try:
            threads.clear()
            out = await b.submit({"x": np.full((1, 1), 3, np.float32)})
        finally:
            await b.stop()
        assert out.outputs["y"][0, 0] == 6
        if slow:
            assert b.inline_max_rows == 0 and threads[0].startswith("infer-")
        else:
            assert b.inline_max_rows == 8 and threads == [threading.current_thread().name]
