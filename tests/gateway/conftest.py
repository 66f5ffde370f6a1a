"""Gateway fixtures: a real Envoy rendered from the project's template in front of real services.

Tokens are signed with a key made for the test session (never the repository's dev key);
every test that counts against the rate limit uses its own `sub`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import auth

from tests.support.procs import GatewayProcess, ServiceProcess

_subjects = itertools.count()


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> auth.SigningKey:
    return auth.ensure_dev_keys(Path(tmp_path_factory.mktemp("gateway-keys")))


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> auth.SigningKey:
    """A valid RSA key the gateway does not trust."""
    return auth.ensure_dev_keys(Path(tmp_path_factory.mktemp("other-keys")))


@pytest.fixture
def token(signing_key: auth.SigningKey) -> Callable[..., str]:
    """token(sub=None, **claims) -> a valid RS256 token; a fresh `sub` unless given."""

    def make(sub: str | None = None, **kwargs) -> str:
        return auth.mint_token(signing_key, sub or f"user-{next(_subjects)}", **kwargs)

    return make


@pytest.fixture(scope="session")
def gateway(fraud_service: ServiceProcess, cnn_service: ServiceProcess, sentiment_service: ServiceProcess,
            generic_service: ServiceProcess, signing_key: auth.SigningKey) -> Iterator[GatewayProcess]:
    """Envoy with the local variant's settings in front of the shared services."""
    gw = GatewayProcess({"fraud": [fraud_service.target], "cnn": [cnn_service.target],
                         "sentiment": [sentiment_service.target], "generic": [generic_service.target]},
                        signing_key.jwks_path).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gateway_channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.target) as channel:
        yield channel


@pytest.fixture(scope="session")
def direct(fraud_service: ServiceProcess) -> Iterator[rpc.FraudServiceStub]:
    """A typed stub straight to the fraud service (no gateway), to compare answers with."""
    with grpc.insecure_channel(fraud_service.target) as channel:
        yield rpc.FraudServiceStub(channel)


@pytest.fixture(scope="session")
def fraud_features(model_repository: Path) -> list[list[float]]:
    """Valid feature rows from the model's sample file."""
    import json

    rows = json.loads((model_repository / "fraud" / "1" / "sample.json").read_text())["rows"]
    return [r["features"] for r in rows]
