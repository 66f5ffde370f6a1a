"""Triton's model repository API on every service, called with tritonclient (a client we did not write):
the index, load with a version policy override, versions side by side, unload and load again, with health
and ModelReady truthful at each step; refused unless the service runs in explicit model control mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import FUNCTIONAL_BUDGET_MS
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SERVICES = [  # module, env prefix, model, extra env
    ("fraud_service", "FRAUD_", "fraud", {}),
    ("cnn_service", "CNN_", "cnn", {}),
    ("sentiment_service", "SENTIMENT_", "sentiment", {}),
    ("generic_service", "GENERIC_", "diabetes", {"GENERIC_MODELS": "diabetes"}),
]


def policy(**kind: object) -> str:
    return json.dumps({"version_policy": kind})


def index(client: tc.InferenceServerClient) -> list[tuple[str, str, str, str]]:
    return [(m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", ""))
            for m in client.get_model_repository_index(as_json=True).get("models", [])]


def ready_index(target: str) -> list[str]:
    """RepositoryIndex with `ready` set (tritonclient has no argument for it): the raw stub."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
    return [f"{m.name}/{m.version}" for m in answer.models]


def versions(client: tc.InferenceServerClient, model: str) -> list[str]:
    return client.get_model_metadata(model, as_json=True)["versions"]


@pytest.fixture(params=SERVICES, ids=[s[2] for s in SERVICES])
def explicit(request, versioned_repository: Path) -> Iterator[tuple[ServiceProcess, str]]:
    """One service in explicit model control mode over the two-version repository."""
    module, prefix, model, extra = request.param
    svc = ServiceProcess(module, prefix, env={
        f"{prefix}MODEL_REPOSITORY": str(versioned_repository), f"{prefix}MODEL_CONTROL_MODE": "explicit",
        f"{prefix}LATENCY_BUDGET_MS": FUNCTIONAL_BUDGET_MS, f"{prefix}CACHE_ENABLED": "false", **extra,
    }).start(timeout=180)
    yield svc, model
    svc.stop()


def test_tritonclient_repository_calls_load_swap_and_unload_versions(explicit):
    svc, model = explicit
    client = tc.InferenceServerClient(svc.target)
    try:
        assert "model_repository" in client.get_server_metadata(as_json=True)["extensions"]
        # Start: the default policy serves the newest version.
        assert index(client) == [(model, "2", "READY", "")]
        assert client.is_model_ready(model) and client.is_model_ready(model, "2")
        assert not client.is_model_ready(model, "1")
        assert versions(client, model) == ["2"]

        # Pin version 1 (a rollback): it comes up, then version 2 is retired.
        client.load_model(model, config=policy(specific={"versions": [1]}))
        assert versions(client, model) == ["1"]
        assert client.is_model_ready(model, "1") and not client.is_model_ready(model, "2")
        assert index(client) == [(model, "1", "READY", ""), (model, "2", "UNAVAILABLE", "unloaded")]
        assert client.get_model_config(model, "1", as_json=True)["config"]["name"] == model

        # Both side by side; the default is the newest.
        client.load_model(model, config=policy(all={}))
        assert versions(client, model) == ["1", "2"]
        assert client.is_model_ready(model, "1") and client.is_model_ready(model, "2")
        assert index(client) == [(model, "1", "READY", ""), (model, "2", "READY", "")]

        # Unload: nothing served, health and readiness say so.
        client.unload_model(model)
        assert not client.is_server_ready() and not client.is_model_ready(model)
        assert svc.health() == NOT_SERVING
        assert index(client) == [(model, "1", "UNAVAILABLE", "unloaded"), (model, "2", "UNAVAILABLE", "unloaded")]
        assert ready_index(svc.target) == []

        # A load without an override goes back to the model's own policy: the newest.
        client.load_model(model)
        assert versions(client, model) == ["2"] and client.is_server_ready() and svc.health() == SERVING
    finally:
        client.close()


def test_bad_load_requests_get_clear_errors(fraud_explicit):
    client = tc.InferenceServerClient(fraud_explicit.target)
    try:
        cases = [
            (lambda: client.load_model("cnn"), "StatusCode.NOT_FOUND",
             "model 'cnn' cannot be served by this service; it serves ['fraud']"),
            (lambda: client.load_model("fraud", config='{"max_batch_size": 1}'), "StatusCode.INVALID_ARGUMENT",
             "parameters.config: only {\"version_policy\": ...} can be overridden at load, got ['max_batch_size']; "
             "other settings live in the version's config.json"),
            (lambda: client.load_model("fraud", config=policy(specific={"versions": [9]})), "StatusCode.NOT_FOUND",
             "matches its version policy (specific [9]); versions there: [1, 2]"),
            (lambda: client.unload_model("cnn"), "StatusCode.NOT_FOUND",
             "model 'cnn' is not loaded; loaded: ['fraud']"),
        ]
        for call, status, message in cases:
            with pytest.raises(InferenceServerException) as err:
                call()
            assert err.value.status() == status
            assert message in err.value.message()
        assert versions(client, "fraud") == ["2"]  # nothing changed
    finally:
        client.close()


@pytest.fixture()
def fraud_explicit(versioned_repository: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(versioned_repository), "FRAUD_MODEL_CONTROL_MODE": "explicit"}).start()
    yield svc
    svc.stop()


def test_load_and_unload_are_refused_unless_explicit_but_the_index_answers(fraud_service):
    client = tc.InferenceServerClient(fraud_service.target)
    try:
        assert index(client) == [("fraud", "1", "READY", "")]
        for call in (lambda: client.load_model("fraud"), lambda: client.unload_model("fraud")):
            with pytest.raises(InferenceServerException) as err:
                call()
            assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "is not allowed in model control mode 'none' (models load once at start)" in err.value.message()
            assert "FRAUD_MODEL_CONTROL_MODE=explicit" in err.value.message()
        assert client.is_model_ready("fraud", "1")
    finally:
        client.close()


def test_versions_side_by_side_a_request_pins_one_and_an_unknown_one_is_not_found(versioned_repository):
    """FRAUD_VERSION_POLICY=all: typed `model_version` and OIP `model_version` pick the version; unpinned
    requests get the newest; each answer is its version's (ONNX Runtime on that version's file)."""
    from bench.swaps import reference
    from tests.fraud.helpers import predict_request, stub

    rows, expected = reference(versioned_repository, ("1", "2"))
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(versioned_repository), "FRAUD_VERSION_POLICY": "all",
        "FRAUD_CACHE_ENABLED": "false"}).start()
    channel, typed = stub(svc.target)
    client = tc.InferenceServerClient(svc.target)
    try:
        for pin, served in (("1", "1"), ("2", "2"), ("", "2")):
            answer = typed.Predict(predict_request(rows[0], version=pin), timeout=5).prediction
            assert answer.model_version == served
            assert answer.fraud_probability == pytest.approx(float(expected[served][0]), abs=1e-5)
            inp = tc.InferInput("features", [1, rows.shape[1]], "FP32")
            inp.set_data_from_numpy(rows[:1])
            result = client.infer("fraud", [inp], model_version=pin)
            assert result.get_response().model_version == served
            assert float(result.as_numpy("probabilities")[0, 1]) == pytest.approx(float(expected[served][0]),
                                                                                  abs=1e-5)
        assert abs(expected["1"][0] - expected["2"][0]) > 1e-3  # the versions' answers tell them apart
        with pytest.raises(grpc.RpcError) as err:
            typed.Predict(predict_request(rows[0], version="3"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "model_version: fraud has no version '3' served; served versions: 1, 2"
        with pytest.raises(InferenceServerException, match="has no version '3' served; served versions: 1, 2"):
            client.infer("fraud", [inp], model_version="3")
    finally:
        client.close()
        channel.close()
        svc.stop()
