"""Native gRPC through the gateway's single port: unary, batch and the bidi stream, token in metadata."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import yaml
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc

from tests.fraud.helpers import tx
from tests.gateway.helpers import bearer, rpc_error

pytestmark = pytest.mark.integration


@pytest.fixture
def stub(gateway_channel):
    return rpc.FraudServiceStub(gateway_channel)


def test_unary_matches_direct(stub, direct, token, fraud_features):
    req = pb.PredictRequest(transaction=tx(fraud_features[5], "g-1"))
    via_gateway = stub.Predict(req, metadata=bearer(token()), timeout=5).prediction
    straight = direct.Predict(req, timeout=5).prediction
    assert via_gateway.transaction_id == "g-1"
    assert via_gateway.fraud_probability == pytest.approx(straight.fraud_probability, rel=1e-6)
    assert via_gateway.is_fraud == straight.is_fraud


def test_service_errors_pass_through_with_their_status(stub, token):
    err = rpc_error(stub.Predict, pb.PredictRequest(transaction=tx([0.5] * 3, "g-bad")),
                    metadata=bearer(token()), timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "transaction.features: expected 30 values, got 3"


def test_batch_matches_direct(stub, direct, token, fraud_features):
    req = pb.PredictBatchRequest(transactions=[tx(f, f"gb{i}") for i, f in enumerate(fraud_features[:8])])
    via_gateway = stub.PredictBatch(req, metadata=bearer(token()), timeout=5)
    straight = direct.PredictBatch(req, timeout=5)
    assert [r.prediction.transaction_id for r in via_gateway.results] == [f"gb{i}" for i in range(8)]
    assert [r.prediction.fraud_probability for r in via_gateway.results] == pytest.approx(
        [r.prediction.fraud_probability for r in straight.results], rel=1e-6)


def test_bidi_stream_answers_in_order_with_per_message_errors(stub, direct, token, fraud_features):
    rows = fraud_features[:10]
    messages = [pb.PredictRequest(transaction=tx(f, f"s{i}")) for i, f in enumerate(rows)]
    messages.insert(4, pb.PredictRequest(transaction=tx([1.0], "s-bad")))
    results = list(stub.StreamPredict(iter(messages), metadata=bearer(token()), timeout=10))
    assert len(results) == len(messages)
    assert results[4].WhichOneof("outcome") == "error"
    assert results[4].error.index == 4 and results[4].error.code == "INVALID_ARGUMENT"
    good = [r.prediction for i, r in enumerate(results) if i != 4]
    assert [p.transaction_id for p in good] == [f"s{i}" for i in range(10)]
    want = direct.PredictBatch(pb.PredictBatchRequest(transactions=[tx(f, f"s{i}") for i, f in enumerate(rows)]))
    assert [p.fraud_probability for p in good] == pytest.approx(
        [r.prediction.fraud_probability for r in want.results], rel=1e-6)


def test_bidi_stream_is_interactive_through_the_gateway(stub, token, fraud_features):
    """Each answer arrives before the next message is sent: the gateway does not buffer the stream."""
    sent = threading.Semaphore(0)
    received = []

    def requests():
        for i in range(5):
            yield pb.PredictRequest(transaction=tx(fraud_features[i], f"i{i}"))
            # Wait for the answer to this message before sending the next one.
            assert sent.acquire(timeout=5), f"no answer to message {i} within 5 s"

    for result in stub.StreamPredict(requests(), metadata=bearer(token()), timeout=30):
        received.append(result.prediction.transaction_id)
        sent.release()
    assert received == [f"i{i}" for i in range(5)]


def test_reflection_is_not_exposed_and_oip_reaches_only_the_generic_service(stub, gateway_channel, token):
    """The typed services and the generic service's OIP are routed; reflection and the typed services' own
    OIP stay on the services' ports. (Raw bytes: the test process must not import the OIP stubs.)"""
    reflection = gateway_channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    err = rpc_error(lambda *a, **k: list(reflection(iter([b""]), *a, **k)), metadata=bearer(token()), timeout=5)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    live = gateway_channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
    assert live(b"", metadata=bearer(token()), timeout=5) == b"\x08\x01"  # ServerLiveResponse(live=true)
    infer = gateway_channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    err = rpc_error(infer, b"\x0a\x05fraud", metadata=bearer(token()), timeout=5)  # model_name="fraud"
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "unknown model 'fraud'; served: ['diabetes']"


def test_long_streams_outlive_the_unary_timeout(fraud_service, signing_key, fraud_features):
    """With a 1 s unary timeout, a 2.5 s bidi stream is not cut (streams have an idle timeout instead)."""
    from mlplatform_gateway import auth

    from tests.support.procs import GatewayProcess

    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path,
                        overrides={"timeouts": {"unary_s": 1, "per_try_s": 1}}).start()
    try:
        key = auth.mint_token(signing_key, "long-stream")

        def slow_requests():
            for i in range(6):
                yield pb.PredictRequest(transaction=tx(fraud_features[i], f"l{i}"))
                time.sleep(0.5)

        with grpc.insecure_channel(gw.target) as channel:
            stub = rpc.FraudServiceStub(channel)
            start = time.monotonic()
            results = list(stub.StreamPredict(slow_requests(), metadata=bearer(key), timeout=30))
            assert time.monotonic() - start > 2.5
        assert [r.prediction.transaction_id for r in results] == [f"l{i}" for i in range(6)]
        config = yaml.safe_load(gw.config_path.read_text())
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        timeouts = {r["match"].get("path") or r["match"]["prefix"]: r["route"]["timeout"]
                    for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
                    if (r["match"].get("path") or r["match"]["prefix"]).startswith("/fraud.v1.")}
        assert timeouts == {"/fraud.v1.FraudService/StreamPredict": "0s", "/fraud.v1.FraudService/": "1s"}
    finally:
        gw.stop()
