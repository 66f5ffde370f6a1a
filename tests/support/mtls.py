"""Mutual TLS between the gateway and a service, for tests: a fraud service serving TLS that requires a client
certificate of the internal CA, the gateway's client credentials, and the certificate a server presents."""

from __future__ import annotations

import shutil
import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from mlplatform_gateway import tls

from tests.support.procs import ServiceProcess, free_port


def copy_files(src: tls.TlsFiles, dst: Path) -> tls.TlsFiles:
    """ca.crt, tls.crt, tls.key of `src` copied into `dst` (a directory the test may rewrite: a renewal)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (tls.CA_FILE, tls.CERT_FILE, tls.KEY_FILE):
        shutil.copyfile(src.directory / name, dst / name)
    return tls.TlsFiles(dst)


def mtls_fraud(model_repository: Path, server: tls.TlsFiles) -> ServiceProcess:
    """A fraud service (in-process cache) whose gRPC port serves `server`'s certificate and requires a client
    certificate signed by `server`'s CA; health alone on a plaintext port. Not started."""
    return ServiceProcess("fraud_service", "FRAUD_", health_port=free_port(), env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository),
        "FRAUD_TLS_CERT_FILE": str(server.cert),
        "FRAUD_TLS_KEY_FILE": str(server.key),
        "FRAUD_TLS_CLIENT_CA_FILE": str(server.ca),
    })


def client_credentials(client: tls.TlsFiles | None, trust: tls.TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials trusting `trust`'s CA, presenting `client`'s certificate (None: none)."""
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=trust.ca.read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=trust.ca.read_bytes(),
                                        private_key=client.key.read_bytes(),
                                        certificate_chain=client.cert.read_bytes())


def secure_channel(port: int, client: tls.TlsFiles | None, trust: tls.TlsFiles, name: str = "fraud") -> grpc.Channel:
    """A channel to 127.0.0.1:`port` that verifies the server's certificate names `name`."""
    return grpc.secure_channel(f"127.0.0.1:{port}", client_credentials(client, trust),
                               options=[("grpc.ssl_target_name_override", name)])


def served_certificate(port: int, client: tls.TlsFiles, name: str = "fraud") -> x509.Certificate:
    """The certificate the server on `port` presents to a new connection (verified against `client`'s CA, for
    `name`), over a plain TLS handshake with ALPN h2."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(client.ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
