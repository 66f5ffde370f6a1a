"""The REST API's OpenAPI document: generated from the protos' `google.api.http` annotations (protos/openapi.py),
published as docs/api/openapi.json, served by the gateway at /api/v1/openapi.json without a token, and true to the
gateway: schemathesis generates requests from it (valid and invalid) against the real Envoy in front of the real
services, and every answer must be a documented 2xx or 4xx, never a 5xx, matching the document's schemas."""

from __future__ import annotations

import json
import os
import sys

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from mlplatform_gateway import auth
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.gateway.helpers import http
from tests.support.procs import ROOT

sys.path.insert(0, str(ROOT / "protos"))
import openapi

pytestmark = pytest.mark.integration

PUBLISHED = ROOT / "docs" / "api" / "openapi.json"
GENERATED = ROOT / "protos" / "gen" / "openapi.json"
EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES",
                              "400" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "20"))
"""Examples per operation and mode (valid, invalid): a few hundred requests in all in `make test`; twenty times
more under `make chaos` (HYPOTHESIS_PROFILE=long, as tests/fuzz), or OPENAPI_FUZZ_EXAMPLES."""


def test_published_document_is_current():
    """docs/api/openapi.json is what protos/generate.py makes from the current protos (`make openapi` updates it)."""
    fresh = openapi.dumps(openapi.build((ROOT / "protos" / "gen" / "descriptors.pb").read_bytes()))
    assert GENERATED.read_text() == fresh
    assert PUBLISHED.read_text() == fresh, "run `make openapi` to publish the regenerated document"


def test_document_covers_every_http_binding():
    doc = json.loads(GENERATED.read_text())
    ops = {(path, verb) for path, item in doc["paths"].items() for verb in item}
    assert {("/api/v1/fraud", "post"), ("/api/v1/fraud:batch", "post"), ("/api/v1/cnn", "post"),
            ("/api/v1/cnn:batch", "post"), ("/api/v1/sentiment", "post"), ("/api/v1/sentiment:batch", "post"),
            ("/v2/models/{model_name}/infer", "post"), ("/api/v1/{model_name}", "post"),
            ("/api/v1/openapi.json", "get")} == ops
    infer = doc["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert infer["parameters"][0]["name"] == "model_name"
    body = doc["components"]["schemas"]["inference.ModelInferRequest_Body"]["properties"]
    assert "model_name" not in body and "inputs" in body  # the path parameter is not in the body
    fraud = doc["components"]["schemas"]["fraud.v1.PredictRequest"]
    assert fraud["additionalProperties"] is True  # what the transcoder does: unknown fields are dropped
    assert set(infer["responses"]) >= {"200", "400", "401", "404", "429", "503"}


def test_gateway_serves_the_document_without_a_token(gateway):
    resp = http("GET", f"http://{gateway.target}/api/v1/openapi.json")
    assert resp.status == 200 and resp.headers.get("content-type") == "application/json"
    assert json.loads(resp.body) == json.loads(GENERATED.read_text())
    # Only GET is open: any other method is a call like every other and needs a token.
    assert http("POST", f"http://{gateway.target}/api/v1/openapi.json", b"{}").status == 401


SCHEMA = schemathesis.openapi.from_path(GENERATED) if GENERATED.exists() else None
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()] if SCHEMA is not None else []


CASES = [pytest.param(op, mode, id=f"{op.method.upper()} {op.path} {mode.value}") for op in OPERATIONS
         for mode in GenerationMode if mode is GenerationMode.POSITIVE or op.body or op.path_parameters]
"""Every operation with valid data; with invalid data where it takes any (the document's GET has no input)."""


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_every_generated_request_gets_a_documented_answer(gateway, signing_key, operation, mode):
    """Valid (positive) and invalid (negative) requests from schemathesis' generators: never a 5xx, always a
    documented status, the response's content type and body as documented, schema-invalid data refused (4xx).
    A schema-valid request may still be refused with a documented 400: the protos cannot say that a fraud
    transaction has exactly 30 features or that image bytes must decode (the message names the field)."""
    token = auth.mint_token(signing_key, f"fuzz-{os.getpid()}", tier="internal")
    base_url = f"http://{gateway.target}"
    session = requests.Session()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.call_and_validate(base_url=base_url, session=session, excluded_checks=[positive_data_acceptance],
                               headers={"Authorization": f"Bearer {token}"}, timeout=30)

    check()


def test_header_names_grpc_forbids_are_dropped_not_fatal(gateway, token, fraud_features):
    """Found by the fuzzing above: a REST header whose name gRPC forbids (`1$ix8`) reached the service, whose gRPC
    server failed the call (500 INTERNAL "Illegal header key"). The gateway drops such headers now."""
    body = json.dumps({"transaction": {"transaction_id": "h", "features": fraud_features[0]}}).encode()
    resp = http("POST", f"http://{gateway.target}/api/v1/fraud", body,
                headers={"Authorization": f"Bearer {token()}", "content-type": "application/json",
                         "1$ix8": "x", "x-fine": "z"})
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["prediction"]["model_name"] == "fraud"
