"""mlplatform.pipeline.Predictor: cache -> batcher under the breaker -> fallback, with a real numpy model."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from mlplatform.batching import DynamicBatcher
from mlplatform.breaker import Breaker
from mlplatform.cache import LRUCache, row_key
from mlplatform.config import ModelConfig
from mlplatform.errors import (
    DeadlineExpiredError,
    InferenceError,
    InvalidInputError,
    ModelFailedError,
    ModelNotReadyError,
)
from mlplatform.model import Model
from mlplatform.pipeline import NOT_MODEL_FAILURES, Predictor
from mlplatform.repository import ModelVersion
from tests.libs.helpers import wait_until

_names = itertools.count()


class SumModel(Model):
    """y = x.sum(axis=1); with `failing` set, infer raises; the fallback answers -1 per row."""

    def __init__(self, version: ModelVersion, *, with_fallback: bool = True) -> None:
        super().__init__(version)
        self.with_fallback = with_fallback
        self.failing = False
        self.calls: list[np.ndarray] = []
        self.gate: threading.Event | None = None
        self.loaded = False

    def _load(self) -> None:
        self.loaded = True

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(np.array(x, copy=True))
        if self.gate is not None:
            self.gate.wait(10)
        if self.failing:
            raise RuntimeError("runtime crashed")
        return {"y": x.sum(axis=1)}

    def fallback(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        if not self.with_fallback:
            return None
        return {"y": np.full(next(iter(inputs.values())).shape[0], -1.0, dtype=np.float32)}

    @property
    def rows_inferred(self) -> int:
        return sum(len(c) for c in self.calls)


def model_version(tmp_path: Path, name: str) -> ModelVersion:
    config = ModelConfig.model_validate({
        "name": name, "version": 2, "platform": "numpy", "artifact": "model.npy",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        "batching": {"max_batch_size": 8, "max_queue_delay_ms": 2.0, "max_queue_size": 64},
        "warmup": {"batch_sizes": [1, 8], "iterations": 1},
    })
    return ModelVersion(path=tmp_path, config=config)


@pytest.fixture
async def make_predictor(tmp_path):
    """Build a warmed-up Predictor around a SumModel; stop its batcher at teardown."""
    batchers: list[DynamicBatcher] = []
    models: list[SumModel] = []

    async def make(*, with_fallback: bool = True, cache: bool = True, ready: bool = True,
                   fail_max: int = 3) -> Predictor:
        name = f"sum-{next(_names)}"
        model = SumModel(model_version(tmp_path, name), with_fallback=with_fallback)
        await model.load()
        if ready:
            await model.warmup()
            model.calls.clear()
        cfg = model.config.batching
        batcher = DynamicBatcher(model.infer, max_batch_size=cfg.max_batch_size,
                                 max_queue_delay_s=cfg.max_queue_delay_ms / 1000,
                                 max_queue_size=cfg.max_queue_size, model=model.name, version=model.version)
        await batcher.start()
        batchers.append(batcher)
        models.append(model)
        breaker = Breaker(f"model-{name}", fail_max=fail_max, reset_timeout_s=60, exclude=NOT_MODEL_FAILURES)
        return Predictor(model, batcher, breaker=breaker, cache=LRUCache(1000, 3600) if cache else None)

    yield make
    for model in models:
        if model.gate is not None:
            model.gate.set()
    for batcher in batchers:
        await batcher.stop()


def rows(*values: float) -> np.ndarray:
    """One row per value: [v, v+1, v+2, v+3] (float32), so each row's sum is 4v + 6."""
    return np.array([[v, v + 1, v + 2, v + 3] for v in values], dtype=np.float32)


def sums(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=1)


async def test_fresh_rows_are_inferred_and_cached(make_predictor):
    predictor = await make_predictor()
    model: SumModel = predictor.model  # type: ignore[assignment]
    x = rows(1, 2, 3)

    first = await predictor.predict({"x": x})

    np.testing.assert_array_equal(first.outputs["y"], sums(x))
    assert first.outputs["y"].dtype == np.float32
    assert first.cached.tolist() == [False, False, False]
    assert first.fallback.tolist() == [False, False, False]
    assert model.rows_inferred == 3
    assert len(predictor.cache) == 3  # type: ignore[arg-type]

    second = await predictor.predict({"x": x.copy()})

    assert second.cached.tolist() == [True, True, True]
    assert second.fallback.tolist() == [False, False, False]
    np.testing.assert_array_equal(second.outputs["y"], first.outputs["y"])
    assert second.outputs["y"].dtype == first.outputs["y"].dtype
    assert second.outputs["y"].shape == (3,)
    assert model.rows_inferred == 3  # nothing inferred the second time


async def test_mixed_request_merges_cached_and_new_rows_in_order(make_predictor):
    predictor = await make_predictor()
    model: SumModel = predictor.model  # type: ignore[assignment]
    await predictor.predict({"x": rows(10, 30)})
    model.calls.clear()

    x = rows(10, 20, 30, 40, 10)
    mixed = await predictor.predict({"x": x})

    np.testing.assert_array_equal(mixed.outputs["y"], sums(x))
    assert mixed.cached.tolist() == [True, False, True, False, True]
    assert mixed.fallback.tolist() == [False] * 5
    # only the new rows reached the model, in request order
    assert len(model.calls) == 1
    np.testing.assert_array_equal(model.calls[0], rows(20, 40))
    # and they are cached now
    again = await predictor.predict({"x": rows(40, 20)})
    assert again.cached.tolist() == [True, True]
    np.testing.assert_array_equal(again.outputs["y"], sums(rows(40, 20)))


async def test_cache_keys_carry_model_name_and_version(make_predictor):
    predictor = await make_predictor()
    x = rows(5)
    await predictor.predict({"x": x})
    key = row_key(predictor.model.name, "2", {"x": x[0]})
    assert (await predictor.cache.get_many([key]))[0] is not None  # type: ignore[union-attr]
    other_version = row_key(predictor.model.name, "3", {"x": x[0]})
    assert (await predictor.cache.get_many([other_version]))[0] is None  # type: ignore[union-attr]


async def test_malformed_cache_entry_is_a_miss(make_predictor):
    predictor = await make_predictor()
    x = rows(7, 8)
    key = row_key(predictor.model.name, predictor.model.version, {"x": x[0]})
    await predictor.cache.set_many({key: b"\x00garbage"})  # type: ignore[union-attr]

    result = await predictor.predict({"x": x})

    assert result.cached.tolist() == [False, False]
    np.testing.assert_array_equal(result.outputs["y"], sums(x))
    assert (await predictor.predict({"x": x})).cached.tolist() == [True, True]  # overwritten with a good entry


async def test_cache_lookups_are_counted(make_predictor):
    predictor = await make_predictor()
    await predictor.predict({"x": rows(1, 2)})
    await predictor.predict({"x": rows(1, 2, 3)})
    labels = {"model": predictor.model.name}
    assert REGISTRY.get_sample_value("inference_cache_total", {**labels, "result": "hit"}) == 2
    assert REGISTRY.get_sample_value("inference_cache_total", {**labels, "result": "miss"}) == 3


async def test_without_a_cache_every_call_is_inferred(make_predictor):
    predictor = await make_predictor(cache=False)
    model: SumModel = predictor.model  # type: ignore[assignment]
    x = rows(1, 2)
    for _ in range(2):
        result = await predictor.predict({"x": x})
        np.testing.assert_array_equal(result.outputs["y"], sums(x))
        assert result.cached.tolist() == [False, False]
    assert model.rows_inferred == 4


async def test_model_failure_is_answered_by_the_fallback_and_not_cached(make_predictor):
    predictor = await make_predictor(fail_max=5)
    model: SumModel = predictor.model  # type: ignore[assignment]
    model.failing = True
    x = rows(1, 2, 3)
    fallbacks_before = REGISTRY.get_sample_value(
        "inference_fallback_total", {"model": model.name, "version": model.version}) or 0

    result = await predictor.predict({"x": x})

    assert result.fallback.tolist() == [True, True, True]
    assert result.cached.tolist() == [False, False, False]
    np.testing.assert_array_equal(result.outputs["y"], [-1, -1, -1])
    assert model.rows_inferred == 3  # the model was tried
    assert len(predictor.cache) == 0  # type: ignore[arg-type]
    assert REGISTRY.get_sample_value(
        "inference_fallback_total", {"model": model.name, "version": model.version}) - fallbacks_before == 3
    assert predictor.breaker.state == "closed"

    # once the model recovers the same rows get real, freshly computed answers
    model.failing = False
    healed = await predictor.predict({"x": x})
    assert healed.fallback.tolist() == [False] * 3
    assert healed.cached.tolist() == [False] * 3
    np.testing.assert_array_equal(healed.outputs["y"], sums(x))


async def test_fallback_rows_merge_with_cached_rows(make_predictor):
    predictor = await make_predictor()
    model: SumModel = predictor.model  # type: ignore[assignment]
    await predictor.predict({"x": rows(1)})
    model.failing = True

    result = await predictor.predict({"x": rows(2, 1, 3)})

    assert result.cached.tolist() == [False, True, False]
    assert result.fallback.tolist() == [True, False, True]
    np.testing.assert_array_equal(result.outputs["y"], [-1, sums(rows(1))[0], -1])


async def test_open_breaker_answers_by_fallback_without_calling_the_model(make_predictor):
    predictor = await make_predictor(fail_max=3)
    model: SumModel = predictor.model  # type: ignore[assignment]
    model.failing = True

    for i in range(3):
        result = await predictor.predict({"x": rows(i, i + 0.5)})
        assert result.fallback.tolist() == [True, True]
    assert predictor.breaker.state == "open"
    assert len(model.calls) == 3

    for i in range(5):
        result = await predictor.predict({"x": rows(100 + i)})
        assert result.fallback.tolist() == [True]
        np.testing.assert_array_equal(result.outputs["y"], [-1])
    assert len(model.calls) == 3  # open: the model is not called
    assert len(predictor.cache) == 0  # type: ignore[arg-type]


async def test_without_fallback_a_runtime_failure_is_a_retryable_refusal(make_predictor):
    """UNAVAILABLE naming the model and the failure (not INTERNAL: the request was not served, retry it)."""
    predictor = await make_predictor(with_fallback=False, fail_max=2)
    model: SumModel = predictor.model  # type: ignore[assignment]
    model.failing = True

    for _ in range(2):
        with pytest.raises(ModelFailedError) as err:
            await predictor.predict({"x": rows(1, 2)})
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.retry_after_s == 1
        assert err.value.message == (f"model {model.name} v2 failed on this request (inference failed: RuntimeError: "
                                     "runtime crashed); it was not served, retry it")
        assert isinstance(err.value.__cause__, InferenceError)
    assert predictor.breaker.state == "open"
    with pytest.raises(ModelNotReadyError, match="no fallback") as open_err:
        await predictor.predict({"x": rows(1, 2)})
    assert open_err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(model.calls) == 2
    assert len(predictor.cache) == 0  # type: ignore[arg-type]


async def test_caller_errors_propagate_and_do_not_trip_the_breaker(make_predictor):
    predictor = await make_predictor(fail_max=2)
    model: SumModel = predictor.model  # type: ignore[assignment]
    too_many = np.ones((9, 4), dtype=np.float32)  # max_batch_size is 8

    for _ in range(4):
        with pytest.raises(InvalidInputError):
            await predictor.predict({"x": too_many})
    assert predictor.breaker.state == "closed"
    assert model.calls == []

    # expired deadlines: the requests wait behind a batch blocked in the runtime
    model.gate = threading.Event()
    blocker = asyncio.ensure_future(predictor.batcher.submit({"x": rows(50)}))
    await wait_until(lambda: len(model.calls) == 1)
    expiring = [asyncio.ensure_future(predictor.predict({"x": rows(60 + i)}, timeout_s=0.02)) for i in range(3)]
    await asyncio.sleep(0.1)
    model.gate.set()
    for task in expiring:
        with pytest.raises(DeadlineExpiredError):
            await task
    await blocker
    assert predictor.breaker.state == "closed"
    assert [c[0, 0] for c in model.calls] == [50]
    model.gate = None
    ok = await predictor.predict({"x": rows(70)})
    np.testing.assert_array_equal(ok.outputs["y"], sums(rows(70)))


async def test_predict_before_ready_is_model_not_ready(make_predictor):
    predictor = await make_predictor(ready=False)
    model: SumModel = predictor.model  # type: ignore[assignment]
    assert model.loaded and not model.ready
    with pytest.raises(ModelNotReadyError, match="not ready"):
        await predictor.predict({"x": rows(1)})
    assert model.calls == []
    await model.warmup()
    model.calls.clear()
    result = await predictor.predict({"x": rows(1)})
    np.testing.assert_array_equal(result.outputs["y"], sums(rows(1)))


async def test_unloaded_model_is_not_ready(make_predictor):
    predictor = await make_predictor()
    await predictor.model.unload()
    with pytest.raises(ModelNotReadyError):
        await predictor.predict({"x": rows(1)})
