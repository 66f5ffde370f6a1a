"""`make run`: start the platform locally (Redis, every service that exists), wait until healthy,
print how to call it, and stop everything on Ctrl-C.

Redis is started when `redis-server` is installed (or reused when something already
answers on the Redis port); without it the services fall back to their in-process cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Service:
    """A model service to run: its module, env prefix and default ports (shared/README conventions)."""

    name: str
    module: str
    prefix: str
    grpc_port: int
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)


SERVICES = [
    Service("fraud", "fraud_service", "FRAUD_", 50051, 9101),
]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def start_redis(port: int, procs: list[subprocess.Popen]) -> str | None:
    """Redis URL to use, starting redis-server if needed; None when there is no Redis."""
    url = f"redis://127.0.0.1:{port}/0"
    if port_open(port):
        print(f"redis: something already listens on {port}; using it as the cache")
        return url
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis: redis-server not installed; services use their in-process LRU cache "
              "(apt-get install redis-server to get the shared cache)")
        return None
    workdir = tempfile.mkdtemp(prefix="mlplatform-redis-")
    procs.append(subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    ))
    deadline = time.monotonic() + 10
    while not port_open(port):
        if time.monotonic() > deadline:
            raise SystemExit("redis: did not start within 10 s")
        time.sleep(0.05)
    print(f"redis: started on 127.0.0.1:{port}")
    return url


def wait_serving(svc: Service, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{svc.name}: exited with code {proc.returncode} during start-up (see its log above)")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"{svc.name}: not SERVING after {timeout:.0f} s")


def configured(svc: Service) -> Service:
    """The service with ports taken from the environment when set (`FRAUD_GRPC_PORT`, ...)."""
    svc.grpc_port = int(os.environ.get(f"{svc.prefix}GRPC_PORT", svc.grpc_port))
    svc.metrics_port = int(os.environ.get(f"{svc.prefix}METRICS_PORT", svc.metrics_port))
    return svc


def usage(repo: Path, fraud: Service) -> str:
    sample = json.loads((repo / "fraud" / "1" / "sample.json").read_text())
    features = sample["rows"][0]["features"]
    payload = json.dumps({"transaction": {"transaction_id": "tx-1", "features": features}})
    return f"""
The platform is up. Call it:

  # gRPC with grpcurl (server reflection is on):
  grpcurl -plaintext -d '{payload}' 127.0.0.1:{fraud.grpc_port} fraud.v1.FraudService/Predict

  # Python, typed API:
  {PY} - <<'PY'
import grpc
from fraud.v1 import fraud_pb2 as pb, fraud_pb2_grpc as rpc
stub = rpc.FraudServiceStub(grpc.insecure_channel("127.0.0.1:{fraud.grpc_port}"))
tx = pb.Transaction(transaction_id="tx-1", features={features})
print(stub.Predict(pb.PredictRequest(transaction=tx)))
PY

  # Open Inference Protocol v2 (tritonclient, perf_analyzer, KServe SDK): model "fraud" at 127.0.0.1:{fraud.grpc_port}
  # Metrics: curl -s http://127.0.0.1:{fraud.metrics_port}/metrics | grep ^inference_

Feature order and valid ranges: {repo / 'fraud' / '1' / 'config.json'} (parameters.features).
Press Ctrl-C to stop everything.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    parser.add_argument("--no-wait", action="store_true", help="exit once everything is healthy (for smoke tests)")
    args = parser.parse_args(argv)

    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        redis_url = start_redis(args.redis_port, procs)
        for svc in map(configured, SERVICES):
            env = {**os.environ, f"{svc.prefix}MODEL_REPOSITORY": str(args.model_repository),
                   f"{svc.prefix}GRPC_PORT": str(svc.grpc_port), f"{svc.prefix}METRICS_PORT": str(svc.metrics_port),
                   "PYTHONUNBUFFERED": "1", **svc.env}
            if redis_url:
                env["REDIS_URL"] = redis_url
            proc = subprocess.Popen([PY, "-m", svc.module], env=env, cwd=ROOT)
            procs.append(proc)
            wait_serving(svc, proc)
            print(f"{svc.name}: SERVING on 127.0.0.1:{svc.grpc_port} (metrics :{svc.metrics_port})")
        print(usage(args.model_repository, SERVICES[0]), flush=True)
        while not stopping and not args.no_wait:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(f"a process exited (code {dead[0].returncode}); stopping everything", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        print("stopping...", flush=True)
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        print("stopped.")


if __name__ == "__main__":
    sys.exit(main())
