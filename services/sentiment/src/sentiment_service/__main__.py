"""`python -m sentiment_service`: run the sentiment gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

from mlplatform.server import main as serve
from sentiment_service.api import SPEC
from sentiment_service.settings import SentimentSettings


def main() -> int:
    """Console entry point."""
    return serve(SPEC, SentimentSettings)


if __name__ == "__main__":
    raise SystemExit(main())
