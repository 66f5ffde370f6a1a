"""Length-aware dynamic batching in the served model, read from the service's Prometheus metrics."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sentiment.v1 import sentiment_pb2 as pb
from sentiment.v1 import sentiment_pb2_grpc as rpc

from tests.sentiment.conftest import long_text

pytestmark = pytest.mark.integration

SERIES = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def scrape(svc) -> dict[tuple[str, str], float]:
    """(metric name, kind label or '') -> value, for the sentiment model's batching series."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = SERIES.match(line)
        if not m or 'model="sentiment"' not in m.group(2):
            continue
        kind = re.search(r'kind="(\w+)"', m.group(2))
        out[(m.group(1), kind.group(1) if kind else "")] = float(m.group(3))
    return out


def test_concurrent_mixed_lengths_form_batches_grouped_by_length(sentiment_service):
    shorts = [f"Great product number {i}, love it." for i in range(48)]
    longs = [f"Order {i}: " + long_text(90) for i in range(48)]
    texts = [t for pair in zip(shorts, longs, strict=True) for t in pair]  # interleaved, unique (no cache hits)
    before = scrape(sentiment_service)
    with grpc.insecure_channel(sentiment_service.target) as channel:
        stub = rpc.SentimentServiceStub(channel)
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda t: stub.Predict(pb.PredictRequest(text=t), timeout=120).prediction,
                                    texts))
    after = scrape(sentiment_service)

    def delta(name: str, kind: str = "") -> float:
        return after.get((name, kind), 0.0) - before.get((name, kind), 0.0)

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
