"""Length-aware dynamic batching in the served model, read from the service's Prometheus metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sentiment.v1 import sentiment_pb2 as pb
from sentiment.v1 import sentiment_pb2_grpc as rpc

from tests.sentiment.conftest import long_text
from tests.support import metrics
from tests.support.metrics import scrape

pytestmark = pytest.mark.integration


def test_concurrent_mixed_lengths_form_batches_grouped_by_length(sentiment_service):
    shorts = [f"Great product number {i}, love it." for i in range(48)]
    longs = [f"Order {i}: " + long_text(90) for i in range(48)]
    texts = [t for pair in zip(shorts, longs, strict=True) for t in pair]  # interleaved, unique (no cache hits)
    before = scrape(sentiment_service.metrics_port)
    with grpc.insecure_channel(sentiment_service.target) as channel:
        stub = rpc.SentimentServiceStub(channel)
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda t: stub.Predict(pb.PredictRequest(text=t), timeout=120).prediction,
                                    texts))
    after = scrape(sentiment_service.metrics_port)

    def delta(name: str, kind: str = "") -> float:
        labels = {"model": "sentiment", "version": "1", **({"kind": kind} if kind else {})}
        return metrics.delta(before, after, name, **labels)

    tokens = [r.tokens for r in results]
    assert max(tokens) > 100 and min(tokens) < 20
    runtime_calls = delta("inference_batch_size_count")
    rows = delta("inference_batch_size_sum")
    assert rows == len(texts)
    assert runtime_calls < len(texts) / 2  # requests were coalesced into batches
    real = delta("inference_batch_sequence_positions_total", "real")
    padded = delta("inference_batch_sequence_positions_total", "padded")
    unsplit = delta("inference_batch_sequence_positions_total", "unsplit")
    assert real == sum(tokens)
    naive = len(texts) * 128  # the shipped tokenizer's fixed padding
    assert real <= padded < unsplit <= naive
    waste, fifo_waste = padded - real, unsplit - real
    assert waste < 0.5 * fifo_waste, (padded, unsplit, real)
