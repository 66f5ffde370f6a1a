"""The gRPC floor: a bare `grpc.aio` server answering `grpc.health.v1.Health/Check` and nothing else.

    python -m bench.floor_server [PORT]      (else $FLOOR_GRPC_PORT: mlplatform.launch.ServiceProcess's way)

No interceptors, metrics, reflection or model: what one unary call costs a Python gRPC server on this
machine, the floor the `cost` scenario divides the services' CPU per request by. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve(port: int) -> None:
    """Serve Health/Check (SERVING) on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the port is the one argument, else $FLOOR_GRPC_PORT."""
    args = sys.argv[1:] if argv is None else argv
    asyncio.run(serve(int(args[0]) if args else int(os.environ["FLOOR_GRPC_PORT"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
