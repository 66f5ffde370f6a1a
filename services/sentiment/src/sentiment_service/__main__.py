"""`python -m sentiment_service`: run the sentiment gRPC server until SIGTERM/SIGINT."""

from sentiment_service.api import SPEC

main = SPEC.main

if __name__ == "__main__":
    raise SystemExit(main())
