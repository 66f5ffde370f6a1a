"""Start MLServer with Triton's `ModelConfig` RPC answered inside its own gRPC server (no extra hop).

Runs under `.venv-mlserver/bin/python` (MLServer's interpreter, not the platform's):

    python bench/mlserver_launch.py MODELS_DIR MODEL_CONFIG_RESPONSE_FILE

`perf_analyzer` asks for `inference.GRPCInferenceService/ModelConfig` before it sends load; MLServer 1.7
implements the rest of the Open Inference Protocol but not that Triton extension. This launcher adds one
generic handler for that single method to the same `grpc.aio` server MLServer builds (its own servicer
still answers every other method, `ModelInfer` included), then hands over to MLServer's CLI
(`mlserver start MODELS_DIR`). The handler returns the serialized `ModelConfigResponse` read from the
file (built by `bench/peer_mlserver.py` with tritonclient's protobuf classes), byte for byte, whatever
the request: it is called once per perf_analyzer run, never in the measured path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

METHOD = "ModelConfig"
SERVICE = "inference.GRPCInferenceService"


def model_config_handler(response: bytes) -> grpc.GenericRpcHandler:
    """A generic handler that answers `SERVICE/METHOD` with `response` (raw bytes, no protobuf classes)."""

    async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(
        model_config, request_deserializer=None, response_serializer=None)})


def install(response: bytes) -> None:
    """Patch MLServer's gRPC server factory so every server it creates also answers ModelConfig."""
    from mlserver.grpc import server as mlserver_grpc

    create = mlserver_grpc.GRPCServer._create_server

    def create_with_model_config(self, *args, **kwargs):
        server = create(self, *args, **kwargs)
        server.add_generic_rpc_handlers((model_config_handler(response),))
        return server

    mlserver_grpc.GRPCServer._create_server = create_with_model_config


def main(argv: list[str]) -> int:
    """Install the handler, then run `mlserver start MODELS_DIR`."""
    models_dir, response_file = argv
    install(Path(response_file).read_bytes())
    from mlserver.cli.main import main as mlserver_main

    sys.argv = ["mlserver", "start", models_dir]
    mlserver_main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
