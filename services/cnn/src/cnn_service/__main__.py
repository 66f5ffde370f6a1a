"""`python -m cnn_service`: run the cnn gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

import grpc
from cnn.v1 import cnn_pb2_grpc

from cnn_service.model import CnnModel
from cnn_service.servicer import SERVICE_NAME, CnnServicer
from cnn_service.settings import CnnSettings
from mlplatform.pipeline import Predictor
from mlplatform.server import ServiceSpec
from mlplatform.server import main as serve_main
from mlplatform.settings import ServiceSettings


def _add_servicer(server: grpc.aio.Server, predictor: Predictor, settings: ServiceSettings) -> None:
    cnn_pb2_grpc.add_CnnServiceServicer_to_server(
        CnnServicer(predictor, max_stream_in_flight=settings.max_stream_in_flight), server
    )


SPEC = ServiceSpec(
    name="cnn",
    default_model="cnn",
    model_factory=CnnModel,
    add_servicer=_add_servicer,
    grpc_service_names=(SERVICE_NAME,),
)


def main() -> int:
    """Console entry point."""
    return serve_main(SPEC, CnnSettings)


if __name__ == "__main__":
    sys.exit(main())
