"""The gateway's dev TLS certificate, made the way the dev JWT key is (`python -m mlplatform_gateway keys`).

`ensure_dev_tls` writes, under `<key dir>/tls/`, a dev CA (`ca.crt`; clients trust it: `curl --cacert`,
`grpc.ssl_channel_credentials(ca)`) and a server certificate it signed (`tls.crt`, `tls.key`) for the names
the gateway is reached by: localhost, 127.0.0.1, ::1, `gateway` (compose) and its Kubernetes Service name.
Kubernetes takes the certificate from the `gateway-tls` Secret instead (cert-manager in prod). The key is
readable by every local user (0644): a loopback dev certificate, readable by the compose container's non-root
user; never use it elsewhere.

`ensure_dev_mtls` writes, under `<key dir>/mtls/`, the material of mutual TLS between the gateway and the
services (`MTLS=1 make run`): an internal CA of its own, the gateway's client certificate and the services'
server certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR = "tls"
MTLS_DIR = "mtls"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
DNS_NAMES = ("localhost", "gateway", "gateway.mlplatform.svc", "gateway.mlplatform.svc.cluster.local")
IP_ADDRESSES = ("127.0.0.1", "::1")
VALID_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    """A directory holding ca.crt, tls.crt and tls.key."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_FILE

    @property
    def cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / KEY_FILE


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlplatform dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def ensure_dev_tls(key_dir: Path) -> TlsFiles:
    """The dev CA and the gateway's certificate under `key_dir/tls`, created when missing."""
    files = TlsFiles(key_dir / TLS_DIR)
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    ca_key, ca_cert = new_ca("mlplatform dev CA")
    sans = [*(x509.DNSName(n) for n in DNS_NAMES), *(x509.IPAddress(ipaddress.ip_address(a)) for a in IP_ADDRESSES)]
    key, cert = new_leaf(ca_key, ca_cert, "gateway", sans, ExtendedKeyUsageOID.SERVER_AUTH)
    _write(files, key, cert, ca_cert)
    return files


@dataclass(frozen=True)
class DevMtls:
    """Dev mTLS material between the gateway and the services (`key_dir/mtls/`), signed by its own internal CA.

    `gateway`: the gateway's client certificate (`upstreams.tls.dir`); `services`: one server certificate for
    every service, whose DNS names are the services' names (what the gateway verifies), their Kubernetes
    Service names, localhost and 127.0.0.1. Both hold the internal CA as ca.crt, the layout of a cert-manager
    Secret.
    """

    gateway: TlsFiles
    services: TlsFiles


def ensure_dev_mtls(key_dir: Path, services: list[str]) -> DevMtls:
    """The dev internal CA, the gateway's client certificate and the services' server certificate, created when
    missing (or when a service in `services` is not named by the existing server certificate)."""
    root = key_dir / MTLS_DIR
    material = DevMtls(TlsFiles(root / "gateway"), TlsFiles(root / "services"))
    files = [f for t in (material.gateway, material.services) for f in (t.ca, t.cert, t.key)]
    if all(f.exists() for f in files) and set(services) <= set(
            x509.load_pem_x509_certificate(material.services.cert.read_bytes()).extensions
            .get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)):
        return material
    ca_key, ca_cert = new_ca("mlplatform dev internal CA")
    key, cert = new_leaf(ca_key, ca_cert, "gateway", [x509.DNSName("gateway")], ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(material.gateway, key, cert, ca_cert)
    names = [n for svc in services for n in (svc, f"{svc}.mlplatform.svc", f"{svc}.mlplatform.svc.cluster.local")]
    sans = [*(x509.DNSName(n) for n in (*names, "localhost")),
            *(x509.IPAddress(ipaddress.ip_address(a)) for a in IP_ADDRESSES)]
    key, cert = new_leaf(ca_key, ca_cert, "mlplatform services", sans, ExtendedKeyUsageOID.SERVER_AUTH)
    _write(material.services, key, cert, ca_cert)
    return material


def new_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-256, VALID_DAYS): (key, certificate)."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(common_name)
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    return ca_key, ca_cert


def new_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
             sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for `sans` with extended key usage `usage`, signed by the CA: (key, certificate)."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _write(files: TlsFiles, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, ca: x509.Certificate) -> None:
    files.directory.mkdir(parents=True, exist_ok=True)
    for path, data in ((files.key, pem_key(key)), (files.cert, cert.public_bytes(serialization.Encoding.PEM)),
                       (files.ca, ca.public_bytes(serialization.Encoding.PEM))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
