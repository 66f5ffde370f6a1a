"""Mutual TLS from the gateway to a service (`upstreams.tls`), through the real Envoy to a real fraud service
that requires a client certificate: REST and gRPC are served, the health checks pass over TLS; a gateway with a
client certificate of another CA, or facing a service whose certificate names another service, sends nothing
(its health checks fail: 503, a clear refusal). A renewed client certificate and CA (a Secret volume's atomic
swap) are taken without restarting Envoy."""

from __future__ import annotations

import time

import grpc
import pytest
from cryptography import x509
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import tls
from mlplatform_gateway.local import host_statuses

from tests.fraud.helpers import tx
from tests.gateway.helpers import bearer, held_certificate_serials, post
from tests.support.mtls import mtls_fraud
from tests.support.procs import GatewayProcess
from tests.support.secret_volume import SecretVolume

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def material(signing_key) -> tls.DevMtls:
    return tls.ensure_dev_mtls(signing_key.directory, ["fraud"])


@pytest.fixture(scope="module")
def service(model_repository, material):
    svc = mtls_fraud(model_repository, material.services).start()
    yield svc
    svc.stop()


def gateway_to(service, signing_key, client: tls.TlsFiles) -> GatewayProcess:
    return GatewayProcess({"fraud": [service.target]}, signing_key.jwks_path,
                          {"upstreams": {"tls": {"enabled": True, "dir": str(client.directory)}}}).start()


def test_rest_and_grpc_reach_a_service_that_requires_the_gateways_certificate(service, signing_key, material,
                                                                               token, fraud_features):
    gw = gateway_to(service, signing_key, material.gateway)
    try:
        resp = post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": "rest-mtls",
                                                           "features": fraud_features[0]}}, token=token())
        assert resp.status == 200, resp.body
        prediction = resp.json()["prediction"]
        assert prediction["transaction_id"] == "rest-mtls" and prediction["model_name"] == "fraud"
        with grpc.insecure_channel(gw.target) as channel:
            reply = rpc.FraudServiceStub(channel).Predict(
                pb.PredictRequest(transaction=tx(fraud_features[0], "grpc-mtls")), metadata=bearer(token()),
                timeout=10)
        assert reply.prediction.transaction_id == "grpc-mtls"
        # The same answer as REST's for the same row: one model behind both.
        assert reply.prediction.fraud_probability == pytest.approx(prediction["fraud_probability"], abs=1e-6)
        assert gw.healthy_hosts("fraud") == 1
        config = gw.render()
        assert "UpstreamTlsContext" in config and "sds-upstream-client-certificate.yaml" in config
        # The SDS file beside the config names the client certificate.
        assert str(material.gateway.cert) in (gw.workdir / "sds-upstream-client-certificate.yaml").read_text()
    finally:
        gw.stop()


@pytest.mark.parametrize("mismatch", ["client certificate of another CA", "service certificate naming another"])
def test_a_gateway_that_cannot_verify_or_be_verified_sends_nothing(service, signing_key, token, fraud_features,
                                                                   tmp_path, mismatch):
    if mismatch == "client certificate of another CA":
        client = tls.ensure_dev_mtls(tmp_path, ["fraud"]).gateway  # the service does not trust it
    else:
        # The service trusts this CA's clients, but the gateway (its CA) would need a certificate naming
        # "fraud": a service certificate of the same CA naming only "cnn" is presented instead.
        other = tls.ensure_dev_mtls(tmp_path, ["cnn"])
        client = other.gateway
        service = mtls_fraud(service.env["FRAUD_MODEL_REPOSITORY"], other.services).start()
    gw = GatewayProcess({"fraud": [service.target]}, signing_key.jwks_path,
                        {"upstreams": {"tls": {"enabled": True, "dir": str(client.directory)}}})
    try:
        with pytest.raises(TimeoutError):  # a few health checks (1 s apart), none passes
            gw.start(timeout=4)
        [status] = [s for (cluster, _), s in host_statuses(gw.admin_port).items() if cluster == "fraud"]
        assert "failed_active_hc" in status.health_flags, status
        resp = post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": "x", "features": fraud_features[0]}},
                    token=token())
        assert resp.status == 503, resp.body
    finally:
        gw.stop()
        if mismatch != "client certificate of another CA":
            service.stop()


def test_a_new_internal_ca_and_client_certificate_are_taken_without_a_restart(model_repository, signing_key, token,
                                                                             fraud_features, tmp_path):
    """The gateway's upstream-tls Secret volume swaps to a client certificate and CA of a new internal CA; the
    service is then replaced by one that trusts and presents only the new CA's. The same Envoy process (no
    restart) reconnects and serves: it verifies the service with the new CA and shows the new certificate."""
    first, second = (tls.ensure_dev_mtls(tmp_path / n, ["fraud"]) for n in ("first", "second"))
    names = (tls.CERT_FILE, tls.KEY_FILE, tls.CA_FILE)
    volume = SecretVolume(tmp_path / "upstream-tls")
    volume.write_dir(first.gateway.directory, names)
    service = mtls_fraud(model_repository, first.services).start()
    gw = GatewayProcess({"fraud": [service.target]}, signing_key.jwks_path,
                        {"upstreams": {"tls": {"enabled": True, "dir": str(volume.directory)}}}).start()
    replacement = None

    def predict(transaction_id: str) -> int:
        resp = post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": transaction_id,
                                                           "features": fraud_features[0]}}, token=token())
        assert resp.status != 200 or resp.json()["prediction"]["transaction_id"] == transaction_id
        return resp.status

    try:
        pid = gw.proc.pid
        assert predict("before") == 200
        volume.write_dir(second.gateway.directory, names)
        deadline = time.monotonic() + 5
        new_client = x509.load_pem_x509_certificate(second.gateway.cert.read_bytes()).serial_number
        while new_client not in held_certificate_serials(gw):
            assert time.monotonic() < deadline, "the new client certificate was not loaded within 5 s"
            time.sleep(0.05)
        # From here calls may fail until the service moves to the new CA too: a connection Envoy opens now shows
        # the new certificate, which the old service refuses (a one-sided CA switch; a renewal keeps the CA).
        port = service.port
        service.stop()
        replacement = mtls_fraud(model_repository, second.services)
        replacement.port = port
        replacement.start()
        deadline = time.monotonic() + 15
        while gw.healthy_hosts("fraud") != 1:
            assert time.monotonic() < deadline, f"the service on the new CA never passed its health check:\n{gw.logs()}"
            time.sleep(0.1)
        assert predict("after") == 200
        assert gw.proc.pid == pid and gw.proc.poll() is None
    finally:
        gw.stop()
        for svc in (service, replacement):
            if svc is not None:
                svc.stop()
