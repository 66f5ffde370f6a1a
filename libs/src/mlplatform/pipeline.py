"""The predict path shared by the typed API and the Open Inference Protocol servicer.

cache lookup (per row) -> batcher (queue, coalesce, deadline) under the model's
circuit breaker -> fallback when the model fails or the breaker is open ->
cache store. Each step is a span of the request's trace. A model with no fallback
refuses with UNAVAILABLE when its runtime fails (`ModelFailedError`) or its breaker
is open (`ModelNotReadyError`): not served, retryable elsewhere or later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from mlplatform import cache as cache_mod
from mlplatform import metrics, tracing
from mlplatform.batching import DynamicBatcher, Tensors
from mlplatform.breaker import Breaker, BreakerOpenError
from mlplatform.errors import (
    DeadlineExpiredError,
    InvalidInputError,
    ModelFailedError,
    ModelNotReadyError,
    NotFoundError,
    QueueFullError,
    ServingError,
)
from mlplatform.model import Model

log = logging.getLogger(__name__)

# Errors that are the caller's or the load's, not the model's: they never trip the breaker.
NOT_MODEL_FAILURES = (InvalidInputError, NotFoundError, QueueFullError, DeadlineExpiredError, ModelNotReadyError)


@dataclass
class Prediction:
    """Outputs for N rows, with per-row flags saying where each answer came from."""

    outputs: Tensors
    cached: np.ndarray  # bool[N]
    fallback: np.ndarray  # bool[N]


class Predictor:
    """Runs validated inputs through cache, batcher, breaker and fallback for one model."""

    def __init__(
        self,
        model: Model,
        batcher: DynamicBatcher,
        *,
        breaker: Breaker,
        cache: cache_mod.PredictionCache | None = None,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.breaker = breaker
        self.cache = cache
        self.in_flight = 0
        """Requests holding this predictor (`serving`), from resolving the model to their answer."""
        self._idle: asyncio.Event | None = None

    @contextmanager
    def serving(self) -> Iterator[Predictor]:
        """Count a request as in flight on this version while it is handled, so that a version being
        swapped out is only stopped once every request that resolved it has its answer."""
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (at most `timeout_s`); False when some still are."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return self.in_flight == 0
        return True

    def admit(self, rows: int, timeout_s: float | None) -> None:
        """Refuse at once (RESOURCE_EXHAUSTED) a request the model could not serve in time; called before
        parsing, so an overloaded model spends no CPU on what it refuses. A would-be cache hit is refused
        too: its key needs the parsed input."""
        if not self.model.ready:
            raise ModelNotReadyError(f"model {self.model.name} v{self.model.version} is not ready")
        self.batcher.admit(rows, timeout_s)

    async def predict(self, inputs: Tensors, *, timeout_s: float | None = None,
                      keys: Sequence[str | None] | None = None) -> Prediction:
        """Predict N rows. Raises ServingError subclasses (queue full, deadline, model unavailable).

        `keys[i]`: row i's identity for the cache (e.g. a customer and its transaction's fields), scoped to
        this model version; None (or no `keys`): the row's input tensors (`cache.row_key`)."""
        if not self.model.ready:
            raise ModelNotReadyError(f"model {self.model.name} v{self.model.version} is not ready")
        rows = next(iter(inputs.values())).shape[0]
        if self.cache is None:  # the hot path without a cache: no per-row bookkeeping
            computed, used_fallback = await self._infer(inputs, timeout_s)
            return Prediction(computed, np.zeros(rows, dtype=bool), np.full(rows, used_fallback))
        cached_rows: dict[int, Tensors] = {}
        given = keys
        keys = [cache_mod.identity_key(self.model.name, self.model.version, given[i]) if given and given[i]
                else cache_mod.row_key(self.model.name, self.model.version, {k: v[i] for k, v in inputs.items()})
                for i in range(rows)]
        with tracing.span("cache.get", **{"cache.keys": rows, "model.name": self.model.name}):
            found = await self.cache.get_many(keys)
            tracing.annotate(**{"cache.hits": sum(b is not None for b in found)})
        for i, blob in enumerate(found):
            if blob is not None:
                try:
                    cached_rows[i] = cache_mod.decode_outputs(blob)
                except ValueError as exc:
                    log.warning("ignoring malformed cache entry %s: %s", keys[i], exc)
        cache_mod.record_lookups(self.model.name, len(cached_rows), rows - len(cached_rows))

        miss = [i for i in range(rows) if i not in cached_rows]
        fallback = np.zeros(rows, dtype=bool)
        computed: Tensors = {}
        if miss:
            miss_inputs = inputs if len(miss) == rows else {k: v[miss] for k, v in inputs.items()}
            computed, used_fallback = await self._infer(miss_inputs, timeout_s)
            if used_fallback:
                fallback[miss] = True
            else:
                entries = {keys[i]: cache_mod.encode_outputs({k: v[j] for k, v in computed.items()})
                           for j, i in enumerate(miss)}
                with tracing.span("cache.set", **{"cache.keys": len(entries), "model.name": self.model.name}):
                    await self.cache.set_many(entries)

        cached = np.zeros(rows, dtype=bool)
        cached[list(cached_rows)] = True
        if not cached_rows:
            return Prediction(computed, cached, fallback)
        outputs = _merge(rows, miss, computed, cached_rows)
        return Prediction(outputs, cached, fallback)

    async def _infer(self, inputs: Tensors, timeout_s: float | None) -> tuple[Tensors, bool]:
        """Outputs from the model via the batcher, or from the fallback; the flag says which."""
        try:
            result = await self.breaker.call(lambda: self.batcher.submit(inputs, timeout_s=timeout_s))
        except NOT_MODEL_FAILURES:
            raise
        except Exception as exc:  # InferenceError, BreakerOpenError, runtime crash
            outputs = self.model.fallback(inputs)
            if outputs is None:
                if isinstance(exc, BreakerOpenError):
                    raise ModelNotReadyError(f"model {self.model.name} is failing ({exc}); no fallback") from exc
                raise ModelFailedError(
                    f"model {self.model.name} v{self.model.version} failed on this request ({_reason(exc)}); "
                    "it was not served, retry it", retry_after_s=1) from exc
            log.warning("model %s v%s unavailable (%s); answered by fallback", self.model.name,
                        self.model.version, exc)
            metrics.FALLBACKS.labels(model=self.model.name, version=self.model.version).inc(
                next(iter(inputs.values())).shape[0])
            return outputs, True
        t = result.timing
        tracing.record_span("batch.queue_wait", t.enqueued_ns, t.started_ns, **{"model.name": self.model.name})
        tracing.record_span("model.inference", t.started_ns, t.finished_ns, **{
            "model.name": self.model.name, "model.version": self.model.version, "batch.size": t.batch_rows,
            "batch.rows": t.batch_rows})
        return result.outputs, False


def _reason(exc: BaseException) -> str:
    """The runtime failure in a refusal's message: a ServingError's own message, else the exception's type."""
    return exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"


def _merge(rows: int, miss: list[int], computed: Tensors, cached_rows: dict[int, Tensors]) -> Tensors:
    """Interleave computed rows (at `miss` positions) with cached rows."""
    template = computed or {k: v[np.newaxis] for k, v in next(iter(cached_rows.values())).items()}
    out = {k: np.empty((rows, *v.shape[1:]), dtype=v.dtype) for k, v in template.items()}
    for name, arr in out.items():
        if miss:
            arr[miss] = computed[name]
        for i, row in cached_rows.items():
            arr[i] = row[name]
    return out
