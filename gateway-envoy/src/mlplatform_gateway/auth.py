"""Dev signing keys, their JWKS, and signed tokens for the gateway's `jwt_authn` filter.

`ensure_dev_keys` writes an RSA key pair (private key mode 0600, never committed) and the
matching JWKS that the local and compose variants load; `rotate_dev_keys` / `retire_previous_keys` rotate it
with an overlap (both keys trusted, then the old one dropped); `mint_token` signs an RS256 token
with the claims the gateway checks: `iss`, `aud`, `sub` (the API key the rate limit counts
by), optional `tier`, `iat` and `exp`, and optionally `canary_tester: true` (the only way to
reach a running canary: the gateway drops clients' `x-canary` header and sets it from this
claim). Production issuers publish their own JWKS URI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEV_ISSUER = "mlplatform-dev"
DEV_AUDIENCE = "mlplatform-api"
PRIVATE_KEY_FILE = "signing-key.pem"
JWKS_FILE = "jwks.json"
PREVIOUS_KEYS_FILE = "previous-keys.json"
"""Public JWKs of keys rotated out but still trusted (rotate_dev_keys), until retire_previous_keys."""
CANARY_TESTER_CLAIM = "canary_tester"
"""A verified token with this claim `true` routes to the canary (variants/k8s.yaml `canary.claim`)."""


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> dict[str, str]:
    """The RS256 JWK of a key's public half; `kid` is a thumbprint of the modulus."""
    numbers = (key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key).public_numbers()
    n = _b64url_uint(numbers.n)
    return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": hashlib.sha256(n.encode()).hexdigest()[:16],
            "n": n, "e": _b64url_uint(numbers.e)}


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key with its JWKS, as written under a key directory."""

    private_key: rsa.RSAPrivateKey
    directory: Path

    @property
    def jwks_path(self) -> Path:
        return self.directory / JWKS_FILE

    @property
    def kid(self) -> str:
        return public_jwk(self.private_key)["kid"]

    def pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ensure_dev_keys(directory: Path) -> SigningKey:
    """Load the dev key pair under `directory`, creating it (and its JWKS) when missing."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / PRIVATE_KEY_FILE
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_path} is not an RSA private key")
    else:
        key = generate_key()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(SigningKey(key, directory).pem())
    signing = SigningKey(key, directory)
    _write_jwks(signing)
    return signing


def _previous(directory: Path) -> list[dict[str, str]]:
    path = directory / PREVIOUS_KEYS_FILE
    return json.loads(path.read_text())["keys"] if path.exists() else []


def _write_jwks(signing: SigningKey) -> None:
    """The JWKS: the signing key's public half, then the previous keys still trusted (a rotation's overlap)."""
    keys = [public_jwk(signing.private_key), *(k for k in _previous(signing.directory) if k["kid"] != signing.kid)]
    jwks = json.dumps({"keys": keys}, indent=2) + "\n"
    if not signing.jwks_path.exists() or signing.jwks_path.read_text() != jwks:
        tmp = signing.jwks_path.with_name(f".{JWKS_FILE}.tmp")
        tmp.write_text(jwks)
        os.replace(tmp, signing.jwks_path)  # a JWKS server never serves half a file


def rotate_dev_keys(directory: Path) -> SigningKey:
    """Rotation, step 1: a new signing key; the JWKS publishes it beside the old one, which stays trusted (its
    tokens keep working) until `retire_previous_keys`. Publish the JWKS, wait for the gateways' JWKS cache to
    refresh, then sign with the new key (`mint_token` on the returned key, `make token`)."""
    old = ensure_dev_keys(directory)
    previous = [public_jwk(old.private_key), *_previous(directory)]
    (directory / PREVIOUS_KEYS_FILE).write_text(json.dumps({"keys": previous}, indent=2) + "\n")
    key = generate_key()
    tmp = directory / f".{PRIVATE_KEY_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(SigningKey(key, directory).pem())
    os.replace(tmp, directory / PRIVATE_KEY_FILE)
    signing = SigningKey(key, directory)
    _write_jwks(signing)
    return signing


def retire_previous_keys(directory: Path) -> SigningKey:
    """Rotation, step 2 (once the old key's tokens have expired): the JWKS holds the signing key alone, so
    tokens of the previous keys are refused."""
    (directory / PREVIOUS_KEYS_FILE).unlink(missing_ok=True)
    return ensure_dev_keys(directory)


def mint_token(key: SigningKey, sub: str, *, ttl_s: int = 3600, tier: str | None = None,
               issuer: str = DEV_ISSUER, audience: str = DEV_AUDIENCE, now: float | None = None,
               canary_tester: bool = False, extra: dict[str, object] | None = None) -> str:
    """An RS256 JWT for `sub`, valid for `ttl_s` seconds (the gateway caps the lifetime); `canary_tester`:
    its calls go to a running canary."""
    if not sub:
        raise ValueError("sub must not be empty: it is the API key the gateway rate-limits by")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    iat = int(time.time() if now is None else now)
    claims: dict[str, object] = {"iss": issuer, "aud": audience, "sub": sub, "iat": iat, "exp": iat + ttl_s}
    if tier:
        claims["tier"] = tier
    if canary_tester:
        claims[CANARY_TESTER_CLAIM] = True
    claims.update(extra or {})
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})
