"""`python -m fraud_service`: run the fraud gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

import grpc
from fraud.v1 import fraud_pb2_grpc

from fraud_service.model import FraudModel
from fraud_service.servicer import SERVICE_NAME, FraudServicer
from fraud_service.settings import FraudSettings
from mlplatform.pipeline import Predictor
from mlplatform.server import ServiceSpec
from mlplatform.server import main as serve_main
from mlplatform.settings import ServiceSettings


def _add_servicer(server: grpc.aio.Server, predictor: Predictor, settings: ServiceSettings) -> None:
    fraud_pb2_grpc.add_FraudServiceServicer_to_server(
        FraudServicer(predictor, max_stream_in_flight=settings.max_stream_in_flight), server
    )


SPEC = ServiceSpec(
    name="fraud",
    default_model="fraud",
    model_factory=FraudModel,
    add_servicer=_add_servicer,
    grpc_service_names=(SERVICE_NAME,),
)


def main() -> int:
    """Console entry point."""
    return serve_main(SPEC, FraudSettings)


if __name__ == "__main__":
    sys.exit(main())
