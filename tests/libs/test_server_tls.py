"""TLS and mutual TLS on a service's gRPC port (mlplatform.server_tls), on a real fraud service over loopback:
only a client holding a certificate of the internal CA is served, health alone answers in plaintext on its own
port, and a renewed certificate is served to the next connection without a restart (a half-replaced pair is not).
"""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlplatform_gateway import tls

from fraud_service.settings import FraudSettings
from mlplatform.server_tls import TlsFilesError, load_configuration
from mlplatform.settings import SettingsError, load_settings
from tests.fraud.helpers import predict_request
from tests.support.mtls import copy_files, mtls_fraud, secure_channel, served_certificate
from tests.support.procs import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> tls.DevMtls:
    return tls.ensure_dev_mtls(tmp_path_factory.mktemp("mtls"), ["fraud"])


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> tls.DevMtls:
    """The same layout signed by another CA: certificates the service must not accept."""
    return tls.ensure_dev_mtls(tmp_path_factory.mktemp("other-ca"), ["fraud"])


@pytest.fixture(scope="module")
def service(model_repository, material, tmp_path_factory):
    served = copy_files(material.services, tmp_path_factory.mktemp("served"))
    svc = mtls_fraud(model_repository, served).start()
    yield svc, served
    svc.stop()


@pytest.fixture(scope="module")
def row(model_repository) -> list[float]:
    import json

    return json.loads((model_repository / "fraud" / "1" / "sample.json").read_text())["rows"][0]["features"]


def predict(channel: grpc.Channel, row: list[float], tx_id: str) -> pb.PredictResponse:
    return rpc.FraudServiceStub(channel).Predict(predict_request(row, tx_id), timeout=10)


def refused(channel: grpc.Channel, row: list[float]) -> grpc.RpcError:
    with channel, pytest.raises(grpc.RpcError) as err:
        predict(channel, row, "refused")
    return err.value


def test_only_a_client_with_a_certificate_of_the_internal_ca_is_served(service, material, stranger, row):
    svc, _ = service
    with secure_channel(svc.port, material.gateway, material.services) as channel:
        reply = predict(channel, row, "m1")
    assert reply.prediction.transaction_id == "m1" and reply.prediction.model_name == "fraud"
    assert 0.0 <= reply.prediction.fraud_probability <= 1.0
    # Plaintext, TLS without a client certificate, and a client certificate of another CA: no handshake.
    for channel in (grpc.insecure_channel(svc.target), secure_channel(svc.port, None, material.services),
                    secure_channel(svc.port, stranger.gateway, material.services)):
        assert refused(channel, row).code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the service's certificate.
    assert refused(secure_channel(svc.port, material.gateway, stranger.services), row).code() == \
        grpc.StatusCode.UNAVAILABLE
    # The name is verified too: the certificate names fraud, not cnn.
    assert refused(secure_channel(svc.port, material.gateway, material.services, name="cnn"), row).code() == \
        grpc.StatusCode.UNAVAILABLE


def test_the_health_port_answers_health_alone_in_plaintext(service, row):
    svc, served = service
    with grpc.insecure_channel(f"127.0.0.1:{svc.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "fraud.v1.FraudService", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            predict(channel, row, "no-model-here")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    env = {"FRAUD_GRPC_PORT": str(svc.port), "FRAUD_TLS_CERT_FILE": str(served.cert),
           "FRAUD_TLS_KEY_FILE": str(served.key), "FRAUD_TLS_CLIENT_CA_FILE": str(served.ca), "PATH": ""}
    check = [sys.executable, "-m", "mlplatform.healthcheck", "--module", "fraud_service"]
    ok = subprocess.run(check, env={**env, "FRAUD_HEALTH_PORT": str(svc.health_port)}, cwd=ROOT,
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and f"127.0.0.1:{svc.health_port} (overall): SERVING" in ok.stdout, ok
    no_port = subprocess.run(check, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert no_port.returncode == 2 and "set its HEALTH_PORT" in no_port.stderr, no_port


def test_a_renewed_certificate_is_served_without_a_restart(service, material, tmp_path, row):
    svc, served = service
    before = served_certificate(svc.port, material.gateway)
    # A new CA and certificates (the files of a renewed Secret): the next connection gets the new certificate.
    renewed = tls.ensure_dev_mtls(tmp_path / "renewed", ["fraud"])
    for name in (tls.KEY_FILE, tls.CERT_FILE, tls.CA_FILE):
        (served.directory / name).write_bytes((renewed.services.directory / name).read_bytes())
    after = served_certificate(svc.port, renewed.gateway)
    assert after.serial_number != before.serial_number
    assert after.serial_number == tls.x509.load_pem_x509_certificate(renewed.services.cert.read_bytes()).serial_number
    with secure_channel(svc.port, renewed.gateway, renewed.services) as channel:
        assert predict(channel, row, "renewed").prediction.transaction_id == "renewed"
    # Half replaced (a new certificate beside the old key): refused with a log line, the current one stays.
    third = tls.ensure_dev_mtls(tmp_path / "third", ["fraud"])
    served.cert.write_bytes(third.services.cert.read_bytes())
    assert served_certificate(svc.port, renewed.gateway).serial_number == after.serial_number
    deadline = time.monotonic() + 5
    while "keeping the previous certificate" not in svc.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{served.key} is not the key of the certificate in {served.cert}" in svc.logs()
    # Put the first material back for the other tests (module-scoped service).
    for name in (tls.KEY_FILE, tls.CERT_FILE, tls.CA_FILE):
        (served.directory / name).write_bytes((material.services.directory / name).read_bytes())
    assert served_certificate(svc.port, material.gateway).serial_number == before.serial_number


def test_unusable_files_are_refused_naming_them(material, stranger, tmp_path):
    with pytest.raises(TlsFilesError, match="is not the key of the certificate"):
        load_configuration(material.services.cert, stranger.services.key, None)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(TlsFilesError, match=f"{garbage}: not a PEM certificate"):
        load_configuration(garbage, material.services.key, None)
    with pytest.raises(TlsFilesError, match=f"{garbage}: not PEM CA certificates"):
        load_configuration(material.services.cert, material.services.key, garbage)
    assert load_configuration(material.services.cert, material.services.key, material.services.ca).not_after


@pytest.mark.parametrize(("env", "message"), [
    ({"FRAUD_TLS_CERT_FILE": "{cert}"}, "tls_cert_file and tls_key_file go together"),
    ({"FRAUD_TLS_CLIENT_CA_FILE": "{ca}"}, "tls_client_ca_file (mutual TLS) needs the server's own"),
    ({"FRAUD_TLS_CERT_FILE": "/nope/tls.crt", "FRAUD_TLS_KEY_FILE": "{key}"}, "tls_cert_file: no such file"),
    ({"FRAUD_HEALTH_PORT": "50051", "FRAUD_GRPC_PORT": "50051"}, "grpc_port and health_port are both 50051"),
])
def test_tls_settings_are_checked_at_start(monkeypatch, material, env, message):
    files = {"cert": material.services.cert, "key": material.services.key, "ca": material.services.ca}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**files))
    with pytest.raises(SettingsError) as err:
        load_settings(FraudSettings)
    assert message in str(err.value)


def test_a_service_with_unusable_files_does_not_start(model_repository, material, stranger, tmp_path):
    bad = copy_files(material.services, tmp_path / "bad")
    bad.key.write_bytes(stranger.services.key.read_bytes())
    svc = mtls_fraud(model_repository, bad).start(wait=False)
    try:
        assert svc.proc is not None and svc.proc.wait(60) == 1
    finally:
        svc.stop()
    assert f"{bad.key} is not the key of the certificate in {bad.cert}" in svc.logs()
