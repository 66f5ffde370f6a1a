"""TLS (and mutual TLS) for a service's gRPC port, with certificates re-read when they change.

`server_credentials` builds gRPC's dynamic server credentials: before each new connection's handshake gRPC asks
for the current certificate configuration, and the files are re-read when their modification times changed, so a
certificate renewed in place (cert-manager updating a mounted Secret, an operator copying new files) is served
without a restart. A half-replaced pair (the key of one certificate beside another certificate) or an unreadable
file is refused with a log line, and the previous configuration stays in use.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class TlsFilesError(ValueError):
    """The certificate, key or CA files cannot be used; the message names the file."""


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, ...]
    config: grpc.ServerCertificateConfiguration
    not_after: str


def _stamp(paths: list[Path]) -> tuple[int, ...]:
    stats = [p.stat() for p in paths]
    return tuple(v for st in stats for v in (st.st_mtime_ns, st.st_size))


def load_configuration(cert: Path, key: Path, client_ca: Path | None) -> _Loaded:
    """Read and check the files: the key must belong to the certificate, the CA must parse."""
    paths = [cert, key, *([client_ca] if client_ca else [])]
    try:
        stamp = _stamp(paths)
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        ca_pem = client_ca.read_bytes() if client_ca else None
    except OSError as exc:
        raise TlsFilesError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise TlsFilesError(f"{cert}: not a PEM certificate ({exc})") from exc
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsFilesError(f"{key}: not an unencrypted PEM private key ({exc})") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, public)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise TlsFilesError(f"{key} is not the key of the certificate in {cert}")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise TlsFilesError(f"{client_ca}: not PEM CA certificates ({exc})") from exc
    config = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)
    return _Loaded(stamp, config, leaf.not_valid_after_utc.isoformat())


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """Server credentials for `cert` and `key`; with `client_ca`, clients must present a certificate it signed.

    Raises TlsFilesError at start when the files cannot be used; later changes are picked up before the next
    handshake."""
    current = load_configuration(cert, key, client_ca)
    log.info("TLS: serving %s (valid until %s)%s", cert, current.not_after,
             f", client certificates required (CA {client_ca})" if client_ca else "")
    lock = threading.Lock()
    paths = [cert, key, *([client_ca] if client_ca else [])]
    failed_stamp: tuple[int, ...] | None = None

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal current, failed_stamp
        with lock:
            try:
                stamp = _stamp(paths)
            except OSError:
                return None  # mid-replacement: keep what is served
            if stamp in (current.stamp, failed_stamp):
                return None
            try:
                loaded = load_configuration(cert, key, client_ca)
            except TlsFilesError as exc:
                failed_stamp = stamp  # one log line per change, not per connection
                log.warning("TLS: keeping the previous certificate: %s", exc)
                return None
            current = loaded
            log.info("TLS: reloaded %s (valid until %s)", cert, loaded.not_after)
            return loaded.config

    return grpc.dynamic_ssl_server_credentials(current.config, fetch,
                                               require_client_authentication=client_ca is not None)
