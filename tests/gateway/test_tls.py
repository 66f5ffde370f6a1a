"""TLS at the gateway, through the real Envoy: REST over https and gRPC over TLS (ALPN h2) with the dev CA; a
plaintext request is redirected to https (or refused with `plain_http: off`); the dev certificate names every
address the gateway is reached by; a renewed certificate (a Secret volume's atomic swap) is served without a
restart and without a failed request."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import tls

from tests.fraud.helpers import tx
from tests.gateway.helpers import bearer, held_certificate_serials
from tests.support.procs import GatewayProcess
from tests.support.secret_volume import SecretVolume

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


def presented_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate the gateway presents to a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number


def test_a_renewed_certificate_is_served_without_a_restart_or_a_failed_request(fraud_service, signing_key, tmp_path,
                                                                               token, fraud_features):
    """The listener's certificate through SDS: the Secret volume swaps to a renewed certificate (same CA, a new
    key) under steady HTTPS traffic, one new connection per request. New connections get the new one within a
    second, with no request failed and no Envoy restart; a connection opened before keeps working on the old
    one; admin /certs and the SDS stats follow. A renewal with a mismatched key is refused and counted."""
    ca_key, ca = tls.new_ca("renewal test CA")
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    old, new = (tls.new_leaf(ca_key, ca, "gateway", sans, ExtendedKeyUsageOID.SERVER_AUTH) for _ in range(2))
    volume = SecretVolume(tmp_path / "gateway-tls")

    def files(leaf) -> dict[str, bytes]:
        key, cert = leaf
        return {tls.CERT_FILE: cert.public_bytes(Encoding.PEM), tls.KEY_FILE: tls.pem_key(key),
                tls.CA_FILE: ca.public_bytes(Encoding.PEM)}

    def serial(leaf) -> int:
        return leaf[1].serial_number

    volume.write(files(old))
    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path,
                        {"tls": {"enabled": True, "dir": str(volume.directory), "plain_http": "redirect"}}).start()
    context = ssl.create_default_context(cadata=ca.public_bytes(Encoding.PEM).decode())
    body = json.dumps({"transaction": {"transaction_id": "renewal", "features": fraud_features[0]}})
    # The internal tier: steady traffic well past the standard 100/min.
    headers = {"content-type": "application/json", "authorization": f"Bearer {token(tier='internal')}"}
    outcomes: list[int | str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=context, timeout=10)
            try:
                conn.request("POST", "/api/v1/fraud", body, headers)
                resp = conn.getresponse()
                got = json.loads(resp.read())
                ok = resp.status == 200 and got["prediction"]["transaction_id"] == "renewal"
                outcomes.append(resp.status if ok else f"{resp.status} {got}")
            except Exception as exc:  # every failure is counted and shown
                outcomes.append(repr(exc))
            finally:
                conn.close()

    try:
        pid = gw.proc.pid
        assert presented_serial(gw.port, context) == serial(old)
        kept = http.client.HTTPSConnection("127.0.0.1", gw.port, context=context, timeout=10)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() is not None
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        time.sleep(1.0)
        volume.write(files(new))
        swapped = time.monotonic()
        while presented_serial(gw.port, context) != serial(new):
            assert time.monotonic() - swapped < 5, "the renewed certificate was not served within 5 s"
            time.sleep(0.05)
        took = time.monotonic() - swapped
        time.sleep(1.0)
        stop.set()
        thread.join(15)
        failures = [o for o in outcomes if o != 200]
        assert len(outcomes) > 20 and not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:5]}"
        assert took < 2.0
        print(f"renewed certificate served {took:.2f} s after the swap; {len(outcomes)} requests, none failed")
        # The connection opened before the renewal still answers, on the certificate it started with.
        kept.request("GET", "/healthz")
        assert kept.getresponse().status == 200
        assert x509.load_der_x509_certificate(kept.sock.getpeercert(binary_form=True)).serial_number == serial(old)
        kept.close()
        assert gw.proc.pid == pid and gw.proc.poll() is None
        held = held_certificate_serials(gw)
        assert serial(new) in held and serial(old) not in held
        stats = dict(line.split(": ", 1) for line in gw.admin("/stats?filter=^sds\\.").splitlines())
        assert stats["sds.listener_certificate.key_rotation_failed"] == "0"
        # A renewal whose key does not match its certificate is refused: the previous pair stays served, and the
        # counter the GatewayCertificateReloadFailed alert watches (monitoring/alerts.yaml) counts it.
        broken = files(tls.new_leaf(ca_key, ca, "gateway", sans, ExtendedKeyUsageOID.SERVER_AUTH))
        volume.write({**broken, tls.KEY_FILE: files(new)[tls.KEY_FILE]})
        metric = 'envoy_sds_key_rotation_failed{envoy_xds_resource_name="listener_certificate"} 1'
        deadline = time.monotonic() + 5
        while metric not in gw.admin("/stats/prometheus"):
            assert time.monotonic() < deadline, "the refused renewal was not counted within 5 s"
            time.sleep(0.05)
        assert presented_serial(gw.port, context) == serial(new)
    finally:
        stop.set()
        gw.stop()
