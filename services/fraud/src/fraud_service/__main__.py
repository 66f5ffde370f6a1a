"""`python -m fraud_service`: run the fraud gRPC server until SIGTERM/SIGINT."""

from fraud_service.api import SPEC

main = SPEC.main

if __name__ == "__main__":
    raise SystemExit(main())
