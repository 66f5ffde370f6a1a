"""Admission control: refuse at once what cannot be served in time, instead of queueing it into a timeout.

Every request that reaches a model's batcher is checked against the time it has: the sooner of
the client's deadline (gRPC `grpc-timeout`, which Envoy sets from its route timeout for REST
calls) and the model's latency budget (its SLO, `batching.latency_budget_ms`). The batcher
estimates how long the request would wait (the rows queued ahead of it, in full batches, plus
the batch now in the runtime) and how long its own batch would take, from a running fit of
batch duration against batch rows (`ServiceTime`). When wait + service exceeds the time left,
the request is refused with RESOURCE_EXHAUSTED and a `retry-after` hint (seconds until the
queue ahead of it should have drained). A request that was admitted but has waited longer than
the budget is refused before inference (Triton's queue policy with `timeout_action: REJECT`),
so queue wait never exceeds the budget.

Pure arithmetic, no I/O: the batcher feeds it numbers; tests drive it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlplatform.errors import OverloadedError

RECOVERED_RATIO = 3.0
"""A batch this many times faster than the fit's prediction means the runtime is fast again (see `observe`)."""


class ServiceTime:
    """Batch duration ~ fixed + per_row * rows, fitted by exponentially weighted least squares.

    `prior` points (e.g. timed at start-up at batch 1 and the largest batch) stay in the fit with
    the weight of `prior_weight` observations, so the fit never degenerates when traffic uses one
    batch size only; live observations decay with `half_life` batches.
    """

    def __init__(self, *, half_life: float = 50.0, prior_weight: float = 2.0) -> None:
        if half_life <= 0 or prior_weight < 0:
            raise ValueError("half_life must be > 0 and prior_weight >= 0")
        self._decay = 0.5 ** (1.0 / half_life)
        self._prior_weight = prior_weight
        self._live = [0.0] * 5  # weight, sum x, sum y, sum xx, sum xy
        self._prior = [0.0] * 5
        self._coefficients = (0.0, 0.0)

    @staticmethod
    def _add(sums: list[float], x: float, y: float, w: float) -> None:
        sums[0] += w
        sums[1] += w * x
        sums[2] += w * y
        sums[3] += w * x * x
        sums[4] += w * x * y

    def add_prior(self, rows: int, seconds: float) -> None:
        """A calibration point that is never forgotten (weight `prior_weight`)."""
        self._add(self._prior, float(rows), max(0.0, seconds), self._prior_weight)
        self._coefficients = self._fit()

    def observe(self, rows: int, seconds: float) -> None:
        """One batch of `rows` took `seconds` in the runtime.

        A batch that ran RECOVERED_RATIO times faster than predicted halves the weight of what was learnt
        before it: a slowdown that has ended is forgotten within a few batches (otherwise admission kept
        refusing on the slow regime's estimates for several half-lives after the model was fast again: make
        chaos, model_slow_overload), while a slowdown is still learnt at the normal pace."""
        predicted = self.predict(rows)
        decay = self._decay
        if predicted > 0 and seconds * RECOVERED_RATIO < predicted:
            decay *= 0.5
        self._live = [s * decay for s in self._live]
        self._add(self._live, float(rows), max(0.0, seconds), 1.0)
        self._coefficients = self._fit()

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds per batch, seconds per row), both >= 0; (0, 0) when nothing is known."""
        return self._coefficients

    def _fit(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = (a + b for a, b in zip(self._live, self._prior, strict=True))
        if w <= 0:
            return 0.0, 0.0
        mx, my = sx / w, sy / w
        var = sxx / w - mx * mx
        if var <= 1e-9 * max(1.0, mx * mx):  # one batch size only: all of it is per-row cost (pessimistic)
            return 0.0, my / mx if mx > 0 else 0.0
        slope = max(0.0, (sxy / w - mx * my) / var)
        intercept = my - slope * mx
        if intercept < 0:  # keep the line through the mean, never negative at 0 rows
            slope, intercept = my / mx if mx > 0 else 0.0, 0.0
        return intercept, slope

    def predict(self, rows: int) -> float:
        """Estimated seconds for one batch of `rows` rows (0 when nothing is known)."""
        fixed, per_row = self._coefficients
        return fixed + per_row * rows


@dataclass(frozen=True)
class QueueState:
    """What the batcher knows when a request arrives."""

    queued_rows: int
    """Rows waiting ahead of the new request."""
    slot_free_in_s: float
    """Seconds until a runtime slot frees (0: one is free now)."""
    max_batch_size: int
    concurrency: int = 1
    """Batches in the runtime at once."""


@dataclass(frozen=True)
class Estimate:
    """A request's expected wait in the queue and its own batch's run time, in seconds."""

    wait_s: float
    service_s: float

    @property
    def total_s(self) -> float:
        return self.wait_s + self.service_s


def estimate(state: QueueState, service: ServiceTime, rows: int) -> Estimate:
    """The wait of a request of `rows` rows behind `state`, and its batch's run time.

    The rows ahead run in full batches of `max_batch_size` (under load the batcher closes a batch
    as soon as it is full); the request joins the last, partly filled one if it fits, else the next.
    """
    b = max(1, state.max_batch_size)
    full_ahead, partial = divmod(max(0, state.queued_rows), b)
    batches_ahead = full_ahead
    if partial and partial + rows > b:  # does not fit beside the partial batch: that one runs first
        batches_ahead += 1
        partial = 0
    per_batch = service.predict(b)
    wait = max(0.0, state.slot_free_in_s)
    if batches_ahead:
        wait += batches_ahead * per_batch / max(1, state.concurrency)
    return Estimate(wait, service.predict(partial + rows))


class WaitCorrection:
    """How far real queue waits run over their estimates, learnt from admitted requests.

    The fit knows one runtime call per batch; a model that splits a batch into length groups, or a
    runtime slowed by other processes, waits longer than estimated. Each admitted request's actual
    wait over its estimate (estimates under `min_estimate_s` skipped) feeds an exponentially weighted
    mean; `factor` (at least 1, at most `max_factor`) scales the next estimates. What was learnt fades
    with `half_life_s` of wall time, so a correction learnt in an overload does not outlive it: once the
    queue is short, estimates are too small to teach anything, and refusing light load on an old
    lesson would be a defect.
    """

    def __init__(self, *, alpha: float = 0.05, min_estimate_s: float = 0.002, max_factor: float = 4.0,
                 half_life_s: float = 1.0) -> None:
        self.alpha = alpha
        self.min_estimate_s = min_estimate_s
        self.max_factor = max_factor
        self.half_life_s = half_life_s
        self._excess = 0.0  # ratio - 1, as of `_at`
        self._at = 0.0

    def _faded(self, now: float) -> float:
        return self._excess * 0.5 ** (max(0.0, now - self._at) / self.half_life_s)

    def observe(self, estimated_s: float, actual_s: float, now: float) -> None:
        """One admitted request waited `actual_s` where `estimated_s` was expected (`now`: loop time)."""
        if estimated_s >= self.min_estimate_s:
            excess = self._faded(now)
            self._excess = excess + self.alpha * (actual_s / estimated_s - 1.0 - excess)
            self._at = now

    def factor(self, now: float) -> float:
        """The multiplier for an estimate made at `now`."""
        return min(self.max_factor, max(1.0, 1.0 + self._faded(now)))


def time_left(now: float, deadline: float | None, budget_s: float | None) -> float | None:
    """Seconds a request arriving at `now` has: the sooner of its deadline and now + budget (None: unbounded)."""
    limits = [x for x in (None if deadline is None else deadline - now, budget_s) if x is not None]
    return min(limits) if limits else None


def retry_after_s(wait_s: float) -> int:
    """The `retry-after` hint: whole seconds (HTTP's unit), at least 1."""
    return max(1, math.ceil(wait_s))


HEADROOM = 1.25
"""Admission's safety factor on the estimate: run times vary (other processes share the cores), and a
request refused at once costs the client less than one admitted and then refused after waiting."""


def check(model: str, est: Estimate, left_s: float | None, budget_s: float | None,
          headroom: float = HEADROOM) -> OverloadedError | None:
    """The refusal for a request whose estimate (times `headroom`) does not fit the time it has, or None
    to admit it.

    Only a wait can refuse: an idle model runs a request even when its estimated run time alone
    exceeds the time left (the estimate may be pessimistic; the deadline still applies).
    """
    if left_s is None or est.wait_s <= 0 or est.total_s * headroom <= left_s:
        return None
    what = "the latency budget" if budget_s is not None and left_s >= budget_s else "the time left"
    return OverloadedError(
        f"model {model} is overloaded: estimated queue wait {est.wait_s * 1000:.0f} ms + inference "
        f"{est.service_s * 1000:.0f} ms exceeds {what} ({max(0.0, left_s) * 1000:.0f} ms); retry later",
        retry_after_s=retry_after_s(est.wait_s))


def budget_exceeded(model: str, waited_s: float, budget_s: float) -> OverloadedError:
    """The refusal of an admitted request that has already waited longer than the budget."""
    return OverloadedError(
        f"model {model} is overloaded: waited {waited_s * 1000:.0f} ms in the queue, over its latency budget of "
        f"{budget_s * 1000:.0f} ms; retry later", retry_after_s=retry_after_s(waited_s))
