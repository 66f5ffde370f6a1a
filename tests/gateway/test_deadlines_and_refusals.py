"""Deadlines and refusals through the real Envoy, against a small grpc.aio upstream of the fraud API.

* A REST call has no deadline of its own: the route's timeout reaches the service as a gRPC deadline
  (`grpc-timeout`, so `context.time_remaining()` is finite), a gRPC client's shorter one too.
* A service's refusal keeps its meaning: RESOURCE_EXHAUSTED is HTTP 429, UNAVAILABLE is 503, both with
  the service's `retry-after`; Envoy never retries RESOURCE_EXHAUSTED (that would amplify an overload).
* The gateway's own 429 (rate limit) and 503 (no healthy upstream) carry a Retry-After too.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mlplatform_gateway import auth

from tests.gateway.helpers import bearer, post, rpc_error
from tests.support.procs import GatewayProcess, free_port

pytestmark = pytest.mark.integration

ROUTE_TIMEOUT_S = 15  # variants/local.yaml timeouts.unary_s
PER_TRY_TIMEOUT_S = 2  # timeouts.per_try_s (fraud)
RETRIES = 2  # retries.num


@dataclass
class Call:
    transaction_id: str
    time_remaining: float | None
    metadata: dict[str, str]


@dataclass
class FakeFraud:
    """`fraud.v1.FraudService/Predict` (grpc's server, in threads of the test process). It records every call
    (the deadline it saw, its metadata) and answers by `transaction_id`: "exhausted-N" aborts with
    RESOURCE_EXHAUSTED, "unavailable-N" with UNAVAILABLE, both with trailing metadata `retry-after: N`;
    anything else is a normal answer."""

    port: int = field(default_factory=free_port)
    calls: list[Call] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def calls_for(self, transaction_id: str) -> list[Call]:
        return [c for c in self.calls if c.transaction_id == transaction_id]

    def predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        tid = request.transaction.transaction_id
        self.calls.append(Call(tid, context.time_remaining(), dict(context.invocation_metadata())))
        kind, _, seconds = tid.partition("-")
        if kind in ("exhausted", "unavailable"):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if kind == "exhausted" else grpc.StatusCode.UNAVAILABLE
            context.set_trailing_metadata((("retry-after", seconds),))
            context.abort(code, f"{kind}: try again in {seconds} s")
        return pb.PredictResponse(prediction=pb.FraudPrediction(transaction_id=tid, model_name="fraud",
                                                                model_version="1"))

    def start(self) -> FakeFraud:
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        rpc.add_FraudServiceServicer_to_server(_Servicer(self), self.server)
        self.health = health.HealthServicer()
        self.set_serving(True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_insecure_port(self.target)
        self.server.start()
        return self

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("fraud.v1.FraudService", status)

    def stop(self) -> None:
        self.server.stop(0).wait(10)


class _Servicer(rpc.FraudServiceServicer):
    def __init__(self, fake: FakeFraud) -> None:
        self.Predict = fake.predict


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFraud]:
    server = FakeFraud().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake_gateway(fake: FakeFraud, signing_key: auth.SigningKey) -> Iterator[GatewayProcess]:
    gw = GatewayProcess({"fraud": [fake.target]}, signing_key.jwks_path).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def fake_stub(fake_gateway: GatewayProcess) -> Iterator[rpc.FraudServiceStub]:
    with grpc.insecure_channel(fake_gateway.target) as channel:
        yield rpc.FraudServiceStub(channel)


def body(transaction_id: str) -> dict:
    return {"transaction": {"transaction_id": transaction_id, "features": [0.0] * 30}}


# ---------------------------------------------------------------- deadlines

def test_rest_call_reaches_the_service_with_the_routes_deadline(fake, fake_gateway, token):
    resp = post(fake_gateway, "/api/v1/fraud", body("deadline-rest"), token=token())
    assert resp.status == 200, resp.body
    [call] = fake.calls_for("deadline-rest")
    # The first attempt's budget: the per-try timeout (shorter than the route's 15 s), sent as grpc-timeout
    # (which gRPC turns into the call's deadline; it is not visible as metadata).
    assert call.time_remaining is not None
    assert 0 < call.time_remaining <= PER_TRY_TIMEOUT_S
    assert call.time_remaining > PER_TRY_TIMEOUT_S - 1
    assert int(call.metadata["x-envoy-expected-rq-timeout-ms"]) == PER_TRY_TIMEOUT_S * 1000


def test_a_grpc_clients_shorter_deadline_wins(fake, fake_stub, token):
    req = pb.PredictRequest(transaction=pb.Transaction(transaction_id="deadline-grpc", features=[0.0] * 30))
    fake_stub.Predict(req, metadata=bearer(token()), timeout=0.8)
    [call] = fake.calls_for("deadline-grpc")
    # Envoy rounds the header it forwards up to whole milliseconds (801m for 0.8 s left).
    assert call.time_remaining is not None and 0 < call.time_remaining <= 0.81


# ---------------------------------------------------------------- refusals

def test_resource_exhausted_is_429_with_retry_after_and_never_retried(fake, fake_gateway, token):
    resp = post(fake_gateway, "/api/v1/fraud", body("exhausted-3"), token=token())
    assert resp.status == 429
    assert resp.headers["retry-after"] == "3"
    assert resp.json()["code"] == 8 and resp.json()["message"] == "exhausted: try again in 3 s"
    assert len(fake.calls_for("exhausted-3")) == 1  # no retry: it would only add load to an overloaded service


def test_resource_exhausted_reaches_grpc_clients_with_retry_after(fake, fake_stub, token):
    req = pb.PredictRequest(transaction=pb.Transaction(transaction_id="exhausted-4", features=[0.0] * 30))
    err = rpc_error(fake_stub.Predict, req, metadata=bearer(token()), timeout=5)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "4") in err.trailing_metadata()
    assert len(fake.calls_for("exhausted-4")) == 1


def test_unavailable_is_503_with_retry_after_and_retries_stay_bounded(fake, fake_gateway, token):
    resp = post(fake_gateway, "/api/v1/fraud", body("unavailable-2"), token=token())
    assert resp.status == 503
    assert resp.headers["retry-after"] == "2"
    assert resp.json()["code"] == 14 and resp.json()["message"] == "unavailable: try again in 2 s"
    # Retried on UNAVAILABLE (a replica shutting down or not ready: another one may answer), at most
    # `retries.num` times and under the cluster's retry budget.
    assert 1 <= len(fake.calls_for("unavailable-2")) <= 1 + RETRIES


def test_the_gateways_own_429_has_retry_after(fake_gateway, fake_stub, token):
    key = token("refusal-rate")
    for _ in range(150):
        resp = post(fake_gateway, "/api/v1/fraud", body("rate"), token=key)
        if resp.status == 429:
            break
        assert resp.status == 200
    assert resp.status == 429
    assert resp.headers["retry-after"] == "1"  # 100/min: a token every 0.6 s
    assert resp.json()["code"] == 8
    req = pb.PredictRequest(transaction=pb.Transaction(transaction_id="rate", features=[0.0] * 30))
    err = rpc_error(fake_stub.Predict, req, metadata=bearer(key), timeout=5)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in err.trailing_metadata()


def test_no_healthy_upstream_is_503_with_retry_after(fake, fake_gateway, token):
    fake.set_serving(False)
    try:
        fake_gateway.wait_healthy(0, cluster="fraud")
        resp = post(fake_gateway, "/api/v1/fraud", body("nobody"), token=token())
        assert resp.status == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["code"] == 14
    finally:
        fake.set_serving(True)
        fake_gateway.wait_healthy(1, cluster="fraud")
