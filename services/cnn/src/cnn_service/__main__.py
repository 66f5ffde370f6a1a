"""`python -m cnn_service`: run the cnn gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

from cnn_service.api import SPEC
from cnn_service.settings import CnnSettings
from mlplatform.server import main as serve


def main() -> int:
    """Console entry point."""
    return serve(SPEC, CnnSettings)


if __name__ == "__main__":
    raise SystemExit(main())
