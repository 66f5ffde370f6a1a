"""TLS at the gateway, through the real Envoy: REST over https and gRPC over TLS (ALPN h2) with the dev CA; a
plaintext request is redirected to https (or refused with `plain_http: off`); the dev certificate names every
address the gateway is reached by."""

from __future__ import annotations

import http.client
import json
import socket
import ssl

import grpc
import pytest
from cryptography import x509
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import tls

from tests.fraud.helpers import tx
from tests.gateway.helpers import bearer
from tests.support.procs import GatewayProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dev_tls(signing_key) -> tls.TlsFiles:
    return tls.ensure_dev_tls(signing_key.directory)


def tls_gateway(fraud_service, signing_key, dev_tls, plain_http: str) -> GatewayProcess:
    return GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path,
                          {"tls": {"enabled": True, "dir": str(dev_tls.directory), "plain_http": plain_http}}).start()


@pytest.fixture(scope="module")
def https_gateway(fraud_service, signing_key, dev_tls):
    gw = tls_gateway(fraud_service, signing_key, dev_tls, "redirect")
    yield gw
    gw.stop()


def test_dev_certificate_names_every_address_and_is_kept(signing_key, dev_tls):
    cert = x509.load_pem_x509_certificate(dev_tls.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName))
    assert {"localhost", "gateway", "gateway.mlplatform.svc.cluster.local"} <= names
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    before = dev_tls.cert.read_bytes()
    assert tls.ensure_dev_tls(signing_key.directory).cert.read_bytes() == before  # not regenerated


def test_rest_over_https_with_the_dev_ca(https_gateway, dev_tls, token, fraud_features):
    context = ssl.create_default_context(cafile=str(dev_tls.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", https_gateway.port, context=context, timeout=10)
    body = json.dumps({"transaction": {"transaction_id": "t1", "features": fraud_features[0]}})
    conn.request("POST", "/api/v1/fraud", body, {"content-type": "application/json",
                                                 "authorization": f"Bearer {token()}"})
    resp = conn.getresponse()
    got = json.loads(resp.read())
    assert resp.status == 200 and got["prediction"]["transaction_id"] == "t1"
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    conn.close()
    # Without the dev CA the client refuses the certificate: it is not a public one.
    with pytest.raises(ssl.SSLCertVerificationError):
        socket_ = socket.create_connection(("127.0.0.1", https_gateway.port), timeout=5)
        ssl.create_default_context().wrap_socket(socket_, server_hostname="localhost")


def test_grpc_over_tls(https_gateway, dev_tls, token, fraud_features, fraud_service):
    creds = grpc.ssl_channel_credentials(root_certificates=dev_tls.ca.read_bytes())
    with grpc.secure_channel(https_gateway.target, creds) as channel:
        stub = rpc.FraudServiceStub(channel)
        reply = stub.Predict(pb.PredictRequest(transaction=tx(fraud_features[0], "g1")), metadata=bearer(token()),
                             timeout=10)
        assert reply.prediction.transaction_id == "g1" and reply.prediction.model_name == "fraud"
        answers = list(stub.StreamPredict(iter([pb.PredictRequest(transaction=tx(fraud_features[0], f"s{i}"))
                                                for i in range(3)]), metadata=bearer(token()), timeout=10))
        assert [a.prediction.transaction_id for a in answers] == ["s0", "s1", "s2"]
    # The same call in cleartext (h2c) does not get through.
    with grpc.insecure_channel(https_gateway.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            rpc.FraudServiceStub(channel).Predict(pb.PredictRequest(transaction=tx(fraud_features[0], "x")),
                                                  metadata=bearer(token()), timeout=5)
        assert err.value.code() != grpc.StatusCode.OK


def test_plaintext_http_is_redirected_to_https(https_gateway):
    conn = http.client.HTTPConnection("127.0.0.1", https_gateway.port, timeout=5)
    conn.request("POST", "/api/v1/fraud?x=1", "{}", {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 308
    assert resp.getheader("location") == f"https://127.0.0.1:{https_gateway.port}/api/v1/fraud?x=1"
    conn.close()


def test_plaintext_off_closes_the_connection(fraud_service, signing_key, dev_tls):
    gw = tls_gateway(fraud_service, signing_key, dev_tls, "off")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected, socket.timeout)):
            conn.request("GET", "/healthz")
            conn.getresponse()
        conn.close()
    finally:
        gw.stop()
