"""`python -m sentiment_service`: run the sentiment gRPC server until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

import grpc
from sentiment.v1 import sentiment_pb2_grpc

from mlplatform.pipeline import Predictor
from mlplatform.repository import ModelVersion
from mlplatform.server import ServiceSpec
from mlplatform.server import main as serve_main
from mlplatform.settings import ServiceSettings
from sentiment_service.model import SentimentModel
from sentiment_service.servicer import SERVICE_NAME, SentimentServicer
from sentiment_service.settings import SentimentSettings


def _add_servicer(server: grpc.aio.Server, predictor: Predictor, settings: ServiceSettings) -> None:
    sentiment_pb2_grpc.add_SentimentServiceServicer_to_server(
        SentimentServicer(predictor, max_stream_in_flight=settings.max_stream_in_flight), server
    )


def _model(version: ModelVersion) -> SentimentModel:
    """The model with the runtime variant `SENTIMENT_RUNTIME` names (default: the config's)."""
    return SentimentModel(version, SentimentSettings().runtime or None)


SPEC = ServiceSpec(
    name="sentiment",
    default_model="sentiment",
    model_factory=_model,
    add_servicer=_add_servicer,
    grpc_service_names=(SERVICE_NAME,),
)


def main() -> int:
    """Console entry point."""
    return serve_main(SPEC, SentimentSettings)


if __name__ == "__main__":
    sys.exit(main())
