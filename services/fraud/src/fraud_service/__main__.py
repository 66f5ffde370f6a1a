"""`python -m fraud_service`: run the fraud gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

from fraud_service.api import SPEC
from fraud_service.settings import FraudSettings
from mlplatform.server import main as serve


def main() -> int:
    """Console entry point."""
    return serve(SPEC, FraudSettings)


if __name__ == "__main__":
    raise SystemExit(main())
