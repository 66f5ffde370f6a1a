"""Signing-key rotation without downtime, through the real Envoy under load.

The gateway verifies tokens against the identity provider's JWKS URI (the k8s variant's `remote_jwks`), refreshed
every `cache_duration`. Here a loopback HTTP server serves the dev key directory's jwks.json, as an identity
provider serves its JWKS, and the key directory is rotated with the same commands an operator runs
(`python -m mlplatform_gateway keys --rotate`, then `--retire-previous`):
1. rotate: the JWKS holds the new key beside the old one; tokens of the old key keep passing;
2. once the gateway's cache has refreshed, clients get tokens of the new key: they pass at once;
3. retire: the JWKS drops the old key; after the refresh its tokens are refused (401), new ones still pass.
Clients send calls all along; not one call with a token that should pass fails."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from mlplatform_gateway import auth

from tests.gateway.helpers import post
from tests.support.procs import GatewayProcess, ServiceProcess

pytestmark = pytest.mark.integration

CACHE_S = 1
"""The gateway's JWKS cache duration here (the k8s variant: 300 s, so a rotation's overlap must exceed that)."""


def test_rotate_then_retire_the_dev_keys(tmp_path):
    old = auth.ensure_dev_keys(tmp_path)
    new = auth.rotate_dev_keys(tmp_path)
    assert new.kid != old.kid
    assert auth.ensure_dev_keys(tmp_path).kid == new.kid  # the new key signs from now on
    kids = [k["kid"] for k in json.loads(new.jwks_path.read_text())["keys"]]
    assert kids == [new.kid, old.kid]  # both trusted during the overlap, and ensure_dev_keys keeps it so
    newer = auth.rotate_dev_keys(tmp_path)
    assert [k["kid"] for k in json.loads(new.jwks_path.read_text())["keys"]] == [newer.kid, new.kid, old.kid]
    auth.retire_previous_keys(tmp_path)
    assert [k["kid"] for k in json.loads(new.jwks_path.read_text())["keys"]] == [newer.kid]


class JwksServer:
    """An identity provider's JWKS endpoint on loopback: serves the key directory's jwks.json as it is now."""

    def __init__(self, jwks_path: Path) -> None:
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = jwks_path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Client:
    """Calls in a loop with whatever token `token` holds; every status recorded with the token's kid."""

    gw: GatewayProcess
    features: list[float]
    token: str
    results: list[tuple[str, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            token = self.token
            kid = jwt.get_unverified_header(token)["kid"]
            status = post(self.gw, "/api/v1/fraud", {"transaction": {"transaction_id": "r", "features": self.features}},
                          token=token).status
            self.results.append((kid, status))
            time.sleep(0.01)


@pytest.fixture
def rotation(fraud_service: ServiceProcess, tmp_path: Path) -> Iterator[tuple[GatewayProcess, JwksServer, Path]]:
    keys = tmp_path / "keys"
    auth.ensure_dev_keys(keys)
    jwks = JwksServer(keys / auth.JWKS_FILE)
    gw = GatewayProcess({"fraud": [fraud_service.target]}, keys / auth.JWKS_FILE,
                        {"auth": {"issuer": auth.DEV_ISSUER,
                                  "jwks": {"file": None, "uri": jwks.uri, "cache_duration_s": CACHE_S}}}).start()
    yield gw, jwks, keys
    gw.stop()
    jwks.close()


def wait_for(probe, want: int, timeout: float = 15.0) -> float:
    """Seconds until `probe()` returns `want`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if probe() == want:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"never {want} within {timeout} s")


def test_rotation_under_load_fails_no_valid_call(rotation, fraud_features):
    gw, jwks, keys = rotation
    features = fraud_features[0]
    old_key = auth.ensure_dev_keys(keys)
    old_token = auth.mint_token(old_key, "rotation", tier="internal")
    clients = [Client(gw, features, old_token) for _ in range(3)]
    threads = [threading.Thread(target=c.run) for c in clients]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        # 1. The new key published beside the old one.
        new_key = auth.rotate_dev_keys(keys)
        new_token = auth.mint_token(new_key, "rotation", tier="internal")
        probe_new = lambda: post(gw, "/api/v1/fraud", {"transaction": {  # noqa: E731
            "transaction_id": "p", "features": features}}, token=new_token).status
        accepted_after = wait_for(probe_new, 200)
        # 2. Clients move to the new key's tokens (an identity provider signs with it once caches have the JWKS).
        for c in clients:
            c.token = new_token
        time.sleep(1.5)
        # 3. The old key retired: its tokens are refused once the JWKS cache refreshes (each probe a token the
        # gateway has never seen); the new ones keep passing.
        auth.retire_previous_keys(keys)
        probe_old = lambda: post(gw, "/api/v1/fraud", {"transaction": {  # noqa: E731
            "transaction_id": "o", "features": features}}, token=auth.mint_token(
                old_key, "rotation", tier="internal", extra={"jti": uuid.uuid4().hex})).status
        refused_after = wait_for(probe_old, 401)
        time.sleep(1.0)
    finally:
        for c in clients:
            c.stop.set()
        for t in threads:
            t.join(10)
    results = [r for c in clients for r in c.results]
    by_kid = {kid: [s for k, s in results if k == kid] for kid in (old_key.kid, new_key.kid)}
    assert len(by_kid[old_key.kid]) >= 30 and len(by_kid[new_key.kid]) >= 30, {k: len(v) for k, v in by_kid.items()}
    assert set(by_kid[old_key.kid]) == {200} and set(by_kid[new_key.kid]) == {200}, (
        {k: sorted(set(v)) for k, v in by_kid.items()})
    assert post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": "n", "features": features}},
                token=new_token).status == 200
    assert accepted_after < 10 and refused_after < 10 and jwks.fetches >= 3
    # A token the gateway verified before the retirement stays in its verified-token cache (jwt_authn's
    # jwt_cache_config, no TTL) until it expires: retiring a *compromised* key also needs the gateway rolled
    # (docs/runbooks/deploy.md, "Signing keys"). This pins that behaviour so a change in Envoy is noticed.
    assert post(gw, "/api/v1/fraud", {"transaction": {"transaction_id": "c", "features": features}},
                token=old_token).status == 200
