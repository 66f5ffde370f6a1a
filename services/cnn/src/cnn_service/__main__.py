"""`python -m cnn_service`: run the cnn gRPC server until SIGTERM/SIGINT."""

from cnn_service.api import SPEC

main = SPEC.main

if __name__ == "__main__":
    raise SystemExit(main())
