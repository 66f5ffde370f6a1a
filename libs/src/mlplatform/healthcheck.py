"""`python -m mlplatform.healthcheck --module fraud_service`: exit 0 when the service reports SERVING.

The container images' HEALTHCHECK. The port is the one the service itself binds: its settings
class (the `ServiceSettings` subclass in `<module>.settings`) read from the same environment,
so `FRAUD_GRPC_PORT=...` moves both; with TLS on the gRPC port, its plaintext `HEALTH_PORT`.
Asks grpc.health.v1 for the overall status (service "") or, with `--service`, for one typed
service. Exit codes: 0 SERVING, 1 anything else (the reason on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlplatform.settings import ServiceSettings, SettingsError, load_settings


def settings_class(module: str) -> type[ServiceSettings]:
    """The one `ServiceSettings` subclass defined in `<module>.settings`."""
    mod = importlib.import_module(f"{module}.settings")
    found = [cls for _, cls in inspect.getmembers(mod, inspect.isclass)
             if issubclass(cls, ServiceSettings) and cls is not ServiceSettings and cls.__module__ == mod.__name__]
    if len(found) != 1:
        raise ValueError(f"{module}.settings defines {len(found)} ServiceSettings subclasses, expected 1")
    return found[0]


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving?, status or error) of `service` at `address` over grpc.health.v1."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", required=True, help="the service's package, e.g. fraud_service")
    parser.add_argument("--service", default="", help="typed service name (default: the overall status)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(settings_class(args.module))
    except (ImportError, ValueError, SettingsError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    if settings.health_port:  # beside a TLS gRPC port: health alone, in plaintext
        address = f"127.0.0.1:{settings.health_port}"
    elif settings.tls:
        print(f"healthcheck: {args.module}'s gRPC port serves TLS: set its HEALTH_PORT (a plaintext port for "
              "grpc.health.v1 alone) to check it", file=sys.stderr)
        return 2
    else:
        address = f"127.0.0.1:{settings.grpc_port}"
    serving, status = check(address, args.service, args.timeout)
    print(f"healthcheck: {args.module} at {address} ({args.service or 'overall'}): {status}",
          file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
