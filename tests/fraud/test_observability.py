"""Prometheus metrics and OpenTelemetry traces from a real fraud process."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from tests.fraud.helpers import perturb, predict_request, stub
from tests.support.otlp import OtlpCollector
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration


def _metric(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_metrics_count_requests_by_status_and_cache(fraud_service, fraud_rows):
    before = _scrape(fraud_service.metrics_port)
    row = perturb(fraud_rows[0][1000:1001], seed=21)[0]
    channel, client = stub(fraud_service.target)
    with channel:
        client.Predict(predict_request(row), timeout=10)
        client.Predict(predict_request(row), timeout=10)
        with pytest.raises(grpc.RpcError):
            client.Predict(predict_request([1.0]), timeout=10)
    after = _scrape(fraud_service.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    ok = {"model": "fraud", "version": "1", "method": "Predict", "status": "OK"}
    assert delta("inference_requests_total", **ok) == 2
    assert delta("inference_requests_total", **{**ok, "status": "INVALID_ARGUMENT"}) == 1
    assert delta("inference_request_duration_seconds_count", model="fraud", method="Predict") == 3
    assert delta("inference_cache_total", model="fraud", result="hit") == 1
    assert delta("inference_cache_total", model="fraud", result="miss") == 1
    assert delta("inference_batch_size_count", model="fraud") >= 1
    assert _metric(after, "inference_model_ready", model="fraud", version="1") == 1
    assert _metric(after, "inference_queue_depth", model="fraud", version="1") == 0
    assert _metric(after, "inference_model_info", model="fraud", platform="onnxruntime_onnx", device="cpu",
                   providers="CPUExecutionProvider") == 1
    assert 'inference_circuit_breaker_state{breaker="redis"} 0.0' in after
    assert 'inference_circuit_breaker_state{breaker="model-fraud"} 0.0' in after
    # latency buckets resolve 0.5 ms .. 2 s
    buckets = re.findall(r'inference_request_duration_seconds_bucket\{le="([^"]+)"', after)
    assert "0.0005" in buckets and "2.0" in buckets
    # health checks are not counted as model traffic
    assert "Check" not in re.findall(r'method="([^"]+)"', after)


def test_traces_continue_the_callers_traceparent(model_repository, fraud_rows):
    collector = OtlpCollector().start()
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository),
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }).start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    try:
        channel, client = stub(svc.target)
        with channel:
            client.Predict(predict_request(fraud_rows[0][5]), timeout=10,
                           metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with collector.lock:
                ours = [s for _, s in collector.spans if s.trace_id.hex() == trace_id]
            if {"batch.queue_wait", "model.inference"} <= {s.name for s in ours}:
                break
            time.sleep(0.1)
    finally:
        svc.stop()
        collector.stop()
    by_name = {s.name: s for s in ours}
    rpc = by_name["/fraud.v1.FraudService/Predict"]
    assert rpc.parent_span_id.hex() == parent_id  # the caller's trace is continued
    for child in ("cache.get", "batch.queue_wait", "model.inference", "cache.set"):
        assert by_name[child].parent_span_id == rpc.span_id, child
    inference = by_name["model.inference"]
    assert inference.end_time_unix_nano > inference.start_time_unix_nano
    assert {service for service, s in collector.spans if s.trace_id.hex() == trace_id} == {"fraud"}
