"""Admission control: the service-time fit, the wait estimate, deadline arithmetic, refusals, and the
batcher refusing at once (never queueing into a timeout) on a runtime slower than the offered load."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from mlplatform import admission
from mlplatform.admission import Estimate, QueueState, ServiceTime
from mlplatform.batching import DynamicBatcher
from mlplatform.errors import OverloadedError, QueueFullError


def fitted(points: list[tuple[int, float]], **kw: float) -> ServiceTime:
    st = ServiceTime(**kw)
    for rows, seconds in points:
        st.observe(rows, seconds)
    return st


# ---------------------------------------------------------------- service time


def test_fit_recovers_fixed_and_per_row_cost() -> None:
    st = fitted([(r, 0.002 + 0.0005 * r) for r in (1, 4, 8, 16, 32, 1, 32, 8)])
    fixed, per_row = st.coefficients()
    assert fixed == pytest.approx(0.002, rel=1e-6)
    assert per_row == pytest.approx(0.0005, rel=1e-6)
    assert st.predict(64) == pytest.approx(0.002 + 0.032, rel=1e-6)


def test_one_batch_size_only_is_all_per_row_cost() -> None:
    st = fitted([(4, 0.008)] * 5)
    assert st.coefficients() == pytest.approx((0.0, 0.002))
    assert st.predict(32) == pytest.approx(0.064)


def test_nothing_known_predicts_zero() -> None:
    st = ServiceTime()
    assert st.coefficients() == (0.0, 0.0)
    assert st.predict(32) == 0.0


def test_live_observations_outweigh_an_old_regime() -> None:
    st = fitted([(r, 0.001 * r) for r in (1, 32) * 50], half_life=10)
    for _ in range(100):  # the runtime got 3x slower (e.g. a noisy neighbour)
        st.observe(1, 0.003)
        st.observe(32, 0.096)
    assert st.predict(32) == pytest.approx(0.096, rel=0.01)


def test_a_slowdown_that_ended_is_forgotten_within_a_few_batches() -> None:
    st = fitted([(r, 0.001 * r) for r in (1, 32) * 50], half_life=50)
    for _ in range(100):  # the model 10x slower for a while (make chaos: model_slow_overload)
        st.observe(1, 0.010)
        st.observe(32, 0.320)
    assert st.predict(32) == pytest.approx(0.320, rel=0.05)
    for _ in range(5):  # fast again: ten batches, not several half-lives of 50, bring the estimate back
        st.observe(1, 0.001)
        st.observe(32, 0.032)
    assert st.predict(32) < 1.5 * 0.032


def test_a_fast_outlier_does_not_erase_a_slow_regime() -> None:
    st = fitted([(r, 0.003 * r) for r in (1, 32) * 50], half_life=50)
    st.observe(32, 0.010)  # one batch 10x faster (noise), then the regime goes on
    for _ in range(3):
        st.observe(1, 0.003)
        st.observe(32, 0.096)
    assert st.predict(32) == pytest.approx(0.096, rel=0.1)


def test_prior_keeps_the_fit_well_posed_when_traffic_uses_one_size() -> None:
    st = ServiceTime(half_life=5, prior_weight=2)
    st.add_prior(1, 0.002)
    st.add_prior(32, 0.010)
    for _ in range(200):  # only single rows for a long time
        st.observe(1, 0.002)
    fixed, per_row = st.coefficients()
    assert fixed > 0.0015 and per_row > 0  # a full batch is still estimated from the prior's slope
    assert 0.006 < st.predict(32) < 0.011


def test_coefficients_are_never_negative() -> None:
    st = fitted([(1, 0.010), (32, 0.001), (16, 0.002)])  # noise that would fit a negative slope
    fixed, per_row = st.coefficients()
    assert fixed >= 0 and per_row >= 0


def test_service_time_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        ServiceTime(half_life=0)


# ---------------------------------------------------------------- the wait estimate


LINEAR = fitted([(1, 0.002), (32, 0.033)])  # 1 ms per batch + 1 ms per row


def test_idle_queue_waits_nothing() -> None:
    est = admission.estimate(QueueState(0, 0.0, 32), LINEAR, 1)
    assert est.wait_s == 0.0
    assert est.service_s == pytest.approx(0.002)


def test_full_batches_ahead_each_cost_a_full_batch() -> None:
    est = admission.estimate(QueueState(100, 0.0, 32), LINEAR, 1)  # 3 full batches, then 4 rows + ours
    assert est.wait_s == pytest.approx(3 * 0.033)
    assert est.service_s == pytest.approx(0.001 + 5 * 0.001)


def test_a_request_that_does_not_fit_beside_the_partial_batch_waits_for_it() -> None:
    est = admission.estimate(QueueState(30, 0.0, 32), LINEAR, 4)
    assert est.wait_s == pytest.approx(0.033)
    assert est.service_s == pytest.approx(0.005)


def test_a_busy_runtime_adds_its_remaining_time_and_concurrency_divides() -> None:
    busy = admission.estimate(QueueState(64, 0.010, 32), LINEAR, 1)
    assert busy.wait_s == pytest.approx(0.010 + 2 * 0.033)
    two_slots = admission.estimate(QueueState(64, 0.0, 32, concurrency=2), LINEAR, 1)
    assert two_slots.wait_s == pytest.approx(0.033)


# ---------------------------------------------------------------- deadline arithmetic and the decision


def test_time_left_is_the_sooner_of_deadline_and_budget() -> None:
    assert admission.time_left(100.0, 100.5, 0.05) == pytest.approx(0.05)
    assert admission.time_left(100.0, 100.02, 0.05) == pytest.approx(0.02)
    assert admission.time_left(100.0, None, 0.05) == pytest.approx(0.05)
    assert admission.time_left(100.0, 100.3, None) == pytest.approx(0.3)
    assert admission.time_left(100.0, None, None) is None
    assert admission.time_left(100.0, 99.0, 0.05) == pytest.approx(-1.0)  # already past: refused if it must wait


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert admission.retry_after_s(0.0) == 1
    assert admission.retry_after_s(0.2) == 1
    assert admission.retry_after_s(1.01) == 2


def test_admits_what_fits_and_refuses_what_does_not() -> None:
    assert admission.check("m", Estimate(0.010, 0.005), 0.050, 0.050) is None
    refusal = admission.check("fraud", Estimate(0.180, 0.002), 0.040, 0.040)
    assert isinstance(refusal, OverloadedError) and isinstance(refusal, QueueFullError)
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.retry_after_s == 1
    assert "model fraud is overloaded" in refusal.message
    assert "180 ms" in refusal.message and "latency budget (40 ms)" in refusal.message


def test_refusal_names_the_client_deadline_when_it_is_sooner() -> None:
    refusal = admission.check("m", Estimate(0.030, 0.002), 0.010, 0.200)
    assert refusal is not None and "the time left (10 ms)" in refusal.message


def test_an_idle_model_is_never_refused_and_no_bound_admits_everything() -> None:
    assert admission.check("m", Estimate(0.0, 0.5), 0.050, 0.050) is None  # only its own run time: let it run
    assert admission.check("m", Estimate(10.0, 0.5), None, None) is None


def test_budget_exceeded_message() -> None:
    err = admission.budget_exceeded("cnn", 0.0912, 0.080)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waited 91 ms in the queue, over its latency budget of 80 ms" in err.message
    assert err.retry_after_s == 1


# ---------------------------------------------------------------- the batcher under overload


def slow_double(per_row_s: float, fixed_s: float):
    def infer(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        time.sleep(fixed_s + per_row_s * len(x))
        return {"y": x * 2}
    return infer


async def test_batcher_refuses_at_once_instead_of_queueing_into_timeouts() -> None:
    budget = 0.060
    b = DynamicBatcher(slow_double(0.002, 0.003), max_batch_size=8, max_queue_delay_s=0.001,
                       max_queue_size=10_000, model="slow", latency_budget_s=budget)
    await b.calibrate([{"x": np.ones((1, 1), np.float32)}, {"x": np.ones((8, 1), np.float32)}])
    await b.start()
    try:
        async def one(i: int) -> tuple[str, float, float]:
            t0 = time.perf_counter()
            try:
                out = await b.submit({"x": np.full((1, 1), i, np.float32)}, timeout_s=5.0)
                return "ok", float(out.outputs["y"][0, 0]), time.perf_counter() - t0
            except OverloadedError as err:
                assert err.retry_after_s is not None and err.retry_after_s >= 1
                return "refused", float(i), time.perf_counter() - t0

        # 400 requests in 0.2 s: ~2000 req/s against a runtime that does ~420 rows/s in batches of 8
        tasks = []
        for i in range(400):
            tasks.append(asyncio.create_task(one(i)))
            if i % 20 == 19:
                await asyncio.sleep(0.01)
        results = await asyncio.gather(*tasks)
    finally:
        await b.stop()
    statuses = [r[0] for r in results]
    assert set(statuses) == {"ok", "refused"}  # no timeouts, no other errors
    ok = [(i, r) for i, r in enumerate(results) if r[0] == "ok"]
    assert all(r[1] == 2 * i for i, r in ok)  # admitted requests get their own right answer
    assert statuses.count("refused") > 100 and len(ok) > 20
    refused_latency = sorted(r[2] for r in results if r[0] == "refused")
    assert refused_latency[len(refused_latency) // 2] < budget  # refused on arrival, not after queueing
    assert b.stats.max_queue_wait_s <= budget  # nobody admitted waited past the budget
    assert b.stats.rejected + b.stats.over_budget == statuses.count("refused")


async def test_admitted_request_that_outwaits_the_budget_is_refused_before_inference() -> None:
    b = DynamicBatcher(slow_double(0.0, 0.050), max_batch_size=1, max_queue_delay_s=0.0,
                       max_queue_size=100, model="slow", latency_budget_s=0.030)
    await b.start()  # not calibrated: the estimate knows nothing, so both are admitted
    try:
        first = asyncio.create_task(b.submit({"x": np.ones((1, 1), np.float32)}))
        await asyncio.sleep(0)
        second = asyncio.create_task(b.submit({"x": np.ones((1, 1), np.float32)}))
        assert (await first).outputs["y"][0, 0] == 2
        with pytest.raises(OverloadedError, match="over its latency budget of 30 ms"):
            await second
    finally:
        await b.stop()
    assert b.stats.over_budget == 1


async def test_no_budget_and_no_deadline_queues_as_before() -> None:
    b = DynamicBatcher(slow_double(0.0, 0.005), max_batch_size=1, max_queue_delay_s=0.0,
                       max_queue_size=100, model="slow")
    await b.calibrate([{"x": np.ones((1, 1), np.float32)}])
    await b.start()
    try:
        outs = await asyncio.gather(*(b.submit({"x": np.full((1, 1), i, np.float32)}) for i in range(10)))
    finally:
        await b.stop()
    assert [float(o.outputs["y"][0, 0]) for o in outs] == [2.0 * i for i in range(10)]
    assert b.stats.rejected == 0


def test_wait_correction_learns_how_far_real_waits_run_over() -> None:
    wc = admission.WaitCorrection(alpha=0.5, half_life_s=1.0)
    assert wc.factor(0.0) == 1.0
    for i in range(20):
        wc.observe(0.010, 0.020, now=i * 0.001)  # real waits twice the estimate (e.g. length groups)
    assert wc.factor(0.02) == pytest.approx(2.0, rel=1e-2)
    wc.observe(0.0005, 1.0, now=0.02)  # estimates too small to compare are skipped
    assert wc.factor(0.02) == pytest.approx(2.0, rel=1e-2)
    assert wc.factor(1.02) == pytest.approx(1.5, rel=1e-2)  # fades: half the excess a second later
    assert wc.factor(10.0) == pytest.approx(1.0, abs=1e-2)  # an old overload does not refuse light load
    for i in range(40):
        wc.observe(0.010, 0.001, now=11 + i * 0.001)  # shorter than estimated: never below 1
    assert wc.factor(11.05) == 1.0
    for i in range(40):
        wc.observe(0.010, 1.0, now=12 + i * 0.001)
    assert wc.factor(12.05) == wc.max_factor  # bounded


async def test_batcher_learns_to_refuse_earlier_when_waits_overrun_estimates() -> None:
    b = DynamicBatcher(slow_double(0.002, 0.003), max_batch_size=8, max_queue_delay_s=0.001,
                       max_queue_size=10_000, model="slow", latency_budget_s=0.060)
    await b.calibrate([{"x": np.ones((1, 1), np.float32)}, {"x": np.ones((8, 1), np.float32)}])
    b.service_time = ServiceTime()  # a fit that underestimates 10x (as if every batch ran in 10 groups)
    b.service_time.add_prior(1, 0.0005)
    b.service_time.add_prior(8, 0.0019)
    await b.start()
    try:
        async def one() -> str:
            try:
                await b.submit({"x": np.ones((1, 1), np.float32)}, timeout_s=5.0)
                return "ok"
            except OverloadedError:
                return "refused"

        for _ in range(6):  # waves of overload: the correction grows from what the admitted ones waited
            await asyncio.gather(*(one() for _ in range(60)))
    finally:
        await b.stop()
    assert b.wait_correction.factor(asyncio.get_running_loop().time()) > 2
