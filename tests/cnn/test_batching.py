"""Dynamic batching of the cnn service, read from its own Prometheus metrics (no timed assertions)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from cnn.v1 import cnn_pb2 as pb
from cnn.v1 import cnn_pb2_grpc as rpc

from tests.cnn.helpers import tensor
from tests.support import metrics
from tests.support.metrics import Samples, scrape
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration

CNN = {"model": "cnn", "version": "1"}


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return metrics.delta(before, after, name, **CNN, **labels)


async def _concurrent(target: str, requests: list[pb.PredictRequest]) -> list[pb.PredictResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.CnnServiceStub(channel)
        return await asyncio.gather(*(stub.Predict(r, timeout=30) for r in requests))


def test_concurrent_requests_are_batched_up_to_32(cnn_service, heldout):
    images, labels = heldout
    requests = [pb.PredictRequest(id=str(i), tensor=tensor(images[i]), top_k=1) for i in range(96)]
    before = scrape(cnn_service.metrics_port)
    responses = asyncio.run(_concurrent(cnn_service.target, requests))
    after = scrape(cnn_service.metrics_port)
    assert [r.classification.id for r in responses] == [str(i) for i in range(96)]
    assert sum(r.classification.classes[0].label == str(labels[i]) for i, r in enumerate(responses)) >= 90

    batches = delta(before, after, "inference_batch_size_count")
    rows = delta(before, after, "inference_batch_size_sum")
    singles = delta(before, after, "inference_batch_size_bucket", le="1.0")
    up_to_32 = delta(before, after, "inference_batch_size_bucket", le="32.0")
    assert rows == 96  # one row per request, no cache in front
    assert batches < 96 and singles < batches, (batches, singles)  # some batches had more than one request
    assert rows / batches > 1
    assert up_to_32 == batches  # none over max_batch_size


def test_a_lone_request_waits_at_most_the_queue_delay(cnn_service, cnn_stub, heldout, cnn_config):
    """Alone, a request waits the configured 20 ms for batch-mates, then runs as a batch of one."""
    assert cnn_config["batching"]["max_queue_delay_ms"] == 20
    time.sleep(0.2)  # nothing else in flight
    before = scrape(cnn_service.metrics_port)
    started = time.perf_counter()
    resp = cnn_stub.Predict(pb.PredictRequest(tensor=tensor(heldout[0][100])), timeout=10)
    elapsed = time.perf_counter() - started
    after = scrape(cnn_service.metrics_port)
    assert resp.classification.classes
    assert delta(before, after, "inference_batch_size_count") == 1
    assert delta(before, after, "inference_batch_size_sum") == 1
    # Queue wait: at least most of the 20 ms delay (nobody joined), and not much more (generous 50 ms bucket).
    assert delta(before, after, "inference_queue_wait_seconds_count") == 1
    assert delta(before, after, "inference_queue_wait_seconds_bucket", le="0.015") == 0
    assert delta(before, after, "inference_queue_wait_seconds_bucket", le="0.05") == 1
    # Inference of one 32x32 image: well under the 50 ms bucket even on a busy CPU.
    assert delta(before, after, "inference_compute_duration_seconds_bucket", le="0.05") == 1
    # The client's round trip is queue wait + inference + transport: generous bound, not a speed target.
    assert elapsed < 1.0


def test_the_service_reports_the_providers_onnx_runtime_gave_it(cnn_service, cnn_config):
    """Whichever of TensorRT, CUDA, CPU the installed onnxruntime offers, in the config's order."""
    import onnxruntime as ort

    from mlplatform.runtimes.onnx import select_providers

    expected = ",".join(p for p, _ in select_providers(ort.get_available_providers(),
                                                        cnn_config["runtime"]["providers"]))
    info = [labels for (name, labels), value in scrape(cnn_service.metrics_port).items()
            if name == "inference_model_info" and ("model", "cnn") in labels and value == 1]
    assert len(info) == 1
    assert dict(info[0])["providers"] == expected
    assert dict(info[0])["device"] == ("cpu" if expected.startswith("CPU") else "gpu")


def test_padding_to_preferred_sizes_keeps_answers_exact(tmp_path, cnn_dir, cnn_config, heldout, onnx_probabilities):
    """`pad_to_preferred: always` (what `gpu` does on a GPU): runtime calls carry 8, 16 or 32 rows; each
    caller still gets its own image's probabilities, and the padding is counted."""
    import json
    import shutil

    version = tmp_path / "cnn" / "1"
    shutil.copytree(cnn_dir, version, ignore=shutil.ignore_patterns("trt_cache"))
    config = {**cnn_config, "batching": {**cnn_config["batching"], "pad_to_preferred": "always"}}
    (version / "config.json").write_text(json.dumps(config))
    svc = ServiceProcess("cnn_service", "CNN_", env={"CNN_MODEL_REPOSITORY": str(tmp_path),
                                                     "CNN_CACHE_ENABLED": "false"}).start()
    try:
        assert "batches padded up to sizes [8, 16, 32] on cpu" in svc.logs()
        images = heldout[0][:45]
        requests = [pb.PredictRequest(id=str(i), tensor=tensor(images[i]), top_k=10) for i in range(45)]
        before = scrape(svc.metrics_port)
        responses = asyncio.run(_concurrent(svc.target, requests))
        after = scrape(svc.metrics_port)
    finally:
        svc.stop()
    expected = onnx_probabilities(images)
    for i, r in enumerate(responses):
        got = {int(c.class_index): c.probability for c in r.classification.classes}
        np.testing.assert_allclose([got[c] for c in range(10)], expected[i], atol=1e-5)
    rows = delta(before, after, "inference_batch_size_sum")
    padding = delta(before, after, "inference_batch_padding_rows_total")
    assert rows == 45
    assert padding > 0
    # every runtime call was 8, 16 or 32 rows: real + padding rows add up to such calls
    assert (rows + padding) % 8 == 0
