"""Replicas behind one health-checked cluster: a replica stopping under load loses no request, and
a service that reports NOT_SERVING gets no traffic (503 / UNAVAILABLE at once, never a hang)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import auth

from tests.gateway.helpers import bearer, post, rpc_error
from tests.support.procs import GatewayProcess, ServiceProcess

pytestmark = pytest.mark.integration


def replica(model_repository: Path, drain_delay_s: float) -> ServiceProcess:
    return ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository),
        "FRAUD_CACHE_ENABLED": "false",  # every request runs the model on the replica that got it
        "FRAUD_DRAIN_DELAY_S": str(drain_delay_s),
        "FRAUD_GRACE_PERIOD_S": "5",
    })


class SteadyLoad:
    """Worker threads sending REST predictions through the gateway until stopped."""

    def __init__(self, gateway: GatewayProcess, token: str, features: list[float], workers: int = 4) -> None:
        self.gateway, self.token, self.features = gateway, token, features
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"transaction": {"transaction_id": f"w{worker}-{n}", "features": self.features}}
            resp = post(self.gateway, "/api/v1/fraud", body, token=self.token, timeout=10)
            with self._lock:
                self.statuses[resp.status] += 1
                if resp.status != 200:
                    self.errors.append(f"{resp.status} {resp.body[:200]!r}")
                elif resp.json()["prediction"]["transaction_id"] != body["transaction"]["transaction_id"]:
                    self.errors.append("answer for another request")

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values())


def wait_for_count(load: SteadyLoad, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while load.total < at_least:
        assert time.monotonic() < deadline, f"only {load.total} requests in {timeout}s"
        time.sleep(0.02)


def upstream_counts(gateway: GatewayProcess) -> Counter[str]:
    time.sleep(0.5)  # let Envoy flush the access log
    return Counter(e["upstream_host"] for e in gateway.access_log() if e["status"] == 200)


@pytest.fixture
def internal_token(signing_key: auth.SigningKey) -> str:
    """A token of the `internal` tier, so that the load is not rate-limited."""
    return auth.mint_token(signing_key, "failover-load", tier="internal")


@pytest.mark.parametrize("drain_delay_s", [0.0, 1.5], ids=["no-drain-delay", "drain-delay"])
def test_stopping_one_of_two_replicas_under_load_loses_nothing(model_repository, signing_key, internal_token,
                                                               fraud_features, drain_delay_s):
    a, b = replica(model_repository, drain_delay_s).start(), replica(model_repository, drain_delay_s).start()
    gw = GatewayProcess({"fraud": [a.target, b.target]}, signing_key.jwks_path).start()
    try:
        with SteadyLoad(gw, internal_token, fraud_features[0]) as load:
            wait_for_count(load, 200)
            assert a.stop(timeout=30) == 0  # SIGTERM: graceful shutdown while requests keep coming
            stopped_at = load.total
            gw.wait_healthy(1, timeout=10)
            wait_for_count(load, stopped_at + 300)
        assert load.errors == [], load.errors[:5]
        assert load.statuses == Counter({200: load.total})
        hosts = upstream_counts(gw)
        assert hosts[a.target] > 0 and hosts[b.target] > 0
        assert sum(hosts.values()) == load.total
    finally:
        gw.stop()
        a.stop(timeout=1)
        b.stop()


def test_not_serving_replica_gets_no_traffic_and_the_other_takes_it(model_repository, signing_key,
                                                                     internal_token, fraud_features):
    a, b = replica(model_repository, 30.0).start(), replica(model_repository, 0.0).start()
    gw = GatewayProcess({"fraud": [a.target, b.target]}, signing_key.jwks_path).start()
    try:
        a.terminate()  # NOT_SERVING for 30 s while it still answers direct calls
        deadline = time.monotonic() + 10
        while a.health("fraud.v1.FraudService") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        gw.wait_healthy(1, timeout=10)
        before = upstream_counts(gw)
        for i in range(40):
            body = {"transaction": {"transaction_id": f"n{i}", "features": fraud_features[0]}}
            assert post(gw, "/api/v1/fraud", body, token=internal_token).status == 200
        after = upstream_counts(gw)
        assert after[a.target] == before[a.target]
        assert after[b.target] == before[b.target] + 40
    finally:
        gw.stop()
        a.stop(timeout=1)  # still in its 30 s drain delay: no need to wait for it
        b.stop()


def test_only_replica_not_serving_gets_503_and_unavailable_promptly(model_repository, signing_key,
                                                                     internal_token, fraud_features):
    a = replica(model_repository, 30.0).start()
    gw = GatewayProcess({"fraud": [a.target]}, signing_key.jwks_path).start()
    try:
        body = {"transaction": {"transaction_id": "p", "features": fraud_features[0]}}
        assert post(gw, "/api/v1/fraud", body, token=internal_token).status == 200
        a.terminate()
        gw.wait_healthy(0, timeout=10)  # two failed checks at a 1 s interval
        # The process still answers direct calls: it is the health signal that takes it out.
        with grpc.insecure_channel(a.target) as ch:
            direct = rpc.FraudServiceStub(ch).Predict(pb.PredictRequest(transaction=pb.Transaction(
                transaction_id="direct", features=fraud_features[0])), timeout=5)
            assert direct.prediction.transaction_id == "direct"
        start = time.monotonic()
        resp = post(gw, "/api/v1/fraud", body, token=internal_token)
        assert time.monotonic() - start < 1.0
        assert resp.status == 503
        assert resp.json() == {"code": 14, "message": "no healthy upstream"}
        with grpc.insecure_channel(gw.target) as ch:
            start = time.monotonic()
            err = rpc_error(rpc.FraudServiceStub(ch).Predict,
                            pb.PredictRequest(transaction=pb.Transaction(features=fraud_features[0])),
                            metadata=bearer(internal_token), timeout=10)
            assert time.monotonic() - start < 1.0
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert err.details() == "no healthy upstream"
    finally:
        gw.stop()
        a.stop(timeout=1)
