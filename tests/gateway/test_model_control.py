"""Model control (the Open Inference Protocol's model-repository RPCs) is never reachable through the gateway:
every `/inference.GRPCInferenceService/Repository…` path is refused (HTTP 403 / PERMISSION_DENIED) with a message
saying where to go instead, in every variant; the generic service's other OIP RPCs are still routed."""

from __future__ import annotations

import grpc
import pytest
import yaml
from mlplatform_gateway import render

from tests.gateway.helpers import bearer, post

pytestmark = pytest.mark.integration

MESSAGE = "model control is not exposed through the gateway; call the service's port directly"
CONTROL = ["RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]


def raw_call(channel: grpc.Channel, method: str, request: bytes, token: str) -> bytes:
    """A unary call with a serialized request (the test process never imports the `inference` stubs)."""
    call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return call(request, metadata=bearer(token), timeout=10)


@pytest.mark.parametrize("method", CONTROL)
def test_grpc_model_control_is_refused_with_permission_denied(gateway_channel, token, method):
    with pytest.raises(grpc.RpcError) as err:
        # RepositoryModelLoad {model_name: "diabetes"}: field 2, length-delimited.
        raw_call(gateway_channel, method, b"\x12\x08diabetes", token())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == MESSAGE


@pytest.mark.parametrize("method", [*CONTROL, "RepositoryAnythingElse"])
def test_http_model_control_is_refused_with_403(gateway, token, method):
    resp = post(gateway, f"/inference.GRPCInferenceService/{method}", {"model_name": "diabetes"}, token=token())
    assert resp.status == 403
    assert resp.json() == {"code": 7, "message": MESSAGE}


def test_other_oip_calls_still_reach_the_generic_service(gateway_channel, token):
    # ServerReady {} -> ServerReadyResponse {ready: true}: field 1, varint 1.
    assert raw_call(gateway_channel, "ServerReady", b"", token()) == b"\x08\x01"


def test_a_token_is_still_required(gateway_channel):
    with pytest.raises(grpc.RpcError) as err:
        gateway_channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("variant", render.VARIANTS)
def test_every_variant_refuses_model_control_before_any_service_route(variant):
    config = yaml.safe_load(render.render(variant, {"files_dir": "/etc/envoy"}))
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    first = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    assert first["match"] == {"prefix": "/inference.GRPCInferenceService/Repository"}
    assert first["direct_response"] == {"status": 403, "body": {"inline_string": MESSAGE}}
