"""Health and lifecycle of a real fraud process: NOT_SERVING until warm-up, graceful drain on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.fraud.helpers import predict_request, stub
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait_health(svc: ServiceProcess, timeout: float = 30.0, service: str = "") -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return svc.health(service)
        except grpc.RpcError:
            time.sleep(0.02)
    raise TimeoutError(svc.logs())


def test_not_serving_until_warm_up_completes(model_repository, fraud_rows):
    # Many warm-up iterations keep the service in warm-up long enough to observe it.
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "FRAUD_WARMUP_ITERATIONS": "400"}).start(wait=False)
    try:
        assert _wait_health(svc) == NOT_SERVING
        assert svc.health("fraud.v1.FraudService") == NOT_SERVING
        channel, client = stub(svc.target)
        with channel:
            with pytest.raises(grpc.RpcError) as err:
                client.Predict(predict_request(fraud_rows[0][0]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "model fraud v1 is not ready"
            svc.wait_serving(timeout=120)
            assert svc.health("fraud.v1.FraudService") == SERVING
            assert svc.health("inference.GRPCInferenceService") == SERVING
            assert client.Predict(predict_request(fraud_rows[0][0]), timeout=5).prediction.model_name == "fraud"
        assert "warmed up fraud v1" in svc.logs()
    finally:
        svc.stop()


def test_sigterm_turns_health_not_serving_and_drains_streams(model_repository, fraud_rows):
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "FRAUD_DRAIN_DELAY_S": "1.5",
        "FRAUD_GRACE_PERIOD_S": "10"}).start()
    rows = fraud_rows[0][:200]
    sent = threading.Event()

    def requests():
        for i, row in enumerate(rows):
            if i == 50:
                sent.set()
            time.sleep(0.01)  # a steady stream spanning the SIGTERM
            yield predict_request(row, str(i))

    channel, client = stub(svc.target)
    results: list = []
    with channel:
        stream = client.StreamPredict(requests(), timeout=30)
        consumer = threading.Thread(target=lambda: results.extend(stream))
        consumer.start()
        assert sent.wait(10)
        svc.terminate()
        time.sleep(0.3)
        assert svc.health() == NOT_SERVING  # load balancers see it at once...
        consumer.join(30)
    rc = svc.proc.wait(30) if svc.proc else None
    # ...while the stream that was open keeps being served to its end.
    assert [r.prediction.transaction_id for r in results] == [str(i) for i in range(200)]
    assert rc == 0
    assert "shutting down" in svc.logs() and "fraud: stopped" in svc.logs()


def test_in_flight_requests_finish_during_drain(model_repository, fraud_rows, tmp_path: Path):
    """Requests queued in the batcher when SIGTERM arrives are answered, not dropped."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "fraud" / "1", repo / "fraud" / "1")
    config_path = repo / "fraud" / "1" / "config.json"
    config = json.loads(config_path.read_text())
    config["batching"]["max_queue_delay_ms"] = 800.0  # requests sit in the queue when SIGTERM lands
    del config["batching"]["latency_budget_ms"]  # (a budget must exceed the queue delay)
    config_path.write_text(json.dumps(config))
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(repo), "FRAUD_GRACE_PERIOD_S": "10", "FRAUD_CACHE_ENABLED": "false"}).start()
    channel, client = stub(svc.target)
    with channel:
        futures = [client.Predict.future(predict_request(r, str(i)), timeout=20)
                   for i, r in enumerate(fraud_rows[0][:16])]
        time.sleep(0.2)
        svc.terminate()
        answers = [f.result().prediction for f in futures]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:  # new calls are refused once draining
            client.Predict(predict_request(fraud_rows[0][0]), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [a.transaction_id for a in answers] == [str(i) for i in range(16)]
    assert svc.proc is not None and svc.proc.wait(20) == 0


def test_bad_setting_stops_start_up_with_a_message_naming_it(model_repository):
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "FRAUD_GRACE_PERIOD_S": "soon"}).start(wait=False)
    assert svc.proc is not None and svc.proc.wait(30) == 2
    assert "FRAUD_GRACE_PERIOD_S" in svc.logs() and "'soon'" in svc.logs()


def test_missing_model_stops_start_up_with_a_message(tmp_path: Path):
    svc = ServiceProcess("fraud_service", "FRAUD_", env={"FRAUD_MODEL_REPOSITORY": str(tmp_path)}).start(wait=False)
    assert svc.proc is not None and svc.proc.wait(30) == 1
    assert "model 'fraud' has no versions" in svc.logs() and "make models" in svc.logs()


def test_message_size_limit_is_a_setting(model_repository, fraud_rows):
    from fraud.v1 import fraud_pb2 as pb

    from tests.fraud.helpers import tx

    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "FRAUD_MAX_MESSAGE_BYTES": "4096"}).start()
    try:
        channel, client = stub(svc.target)
        with channel:
            small = client.PredictBatch(pb.PredictBatchRequest(transactions=[tx(r) for r in fraud_rows[0][:10]]),
                                        timeout=10)
            assert len(small.results) == 10
            with pytest.raises(grpc.RpcError) as err:  # 100 transactions are ~13 KB
                client.PredictBatch(pb.PredictBatchRequest(transactions=[tx(r) for r in fraud_rows[0][:100]]),
                                    timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4096" in err.value.details()
    finally:
        svc.stop()


def test_sigusr1_drains_health_but_keeps_answering_then_sigterm_stops_at_once(model_repository, fraud_rows):
    # A 30 s drain delay would hold SIGTERM that long; after SIGUSR1 the supervisor has already waited.
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "FRAUD_DRAIN_DELAY_S": "30"}).start()
    try:
        svc.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while svc.health() != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.health() == NOT_SERVING
        assert svc.health("fraud.v1.FraudService") == NOT_SERVING
        channel, client = stub(svc.target)
        with channel:
            answer = client.Predict(predict_request(fraud_rows[0][0]), timeout=5).prediction
        assert answer.model_name == "fraud" and 0.0 <= answer.fraud_probability <= 1.0
        assert "draining: NOT_SERVING" in svc.logs()
        started = time.monotonic()
        assert svc.stop(timeout=20) == 0
        assert time.monotonic() - started < 15, "SIGTERM after SIGUSR1 must not wait the drain delay again"
    finally:
        svc.stop()
