"""`make run`: start the platform locally (Redis, every service that exists, the Envoy gateway),
wait until all are healthy, print how to call it, and stop everything on Ctrl-C.

Redis is started when `redis-server` is installed (or reused when something already
answers on the Redis port); without it the services fall back to their in-process cache.
`--replicas N` starts N processes per service (replica i on the service's ports + 100·i)
behind the gateway's health-checked cluster. Gateway: `GATEWAY_PORT` (8080) and
`GATEWAY_ADMIN_PORT` (9901, loopback); its JSON access log goes to .run/gateway/access.log.
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
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlplatform_gateway import auth
from mlplatform_gateway import local as gateway

from mlplatform.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))
from deploy import catalog  # noqa: E402  (the repository root holds the service list)
from deploy.catalog import Service  # noqa: E402

SERVICES = catalog.services()
"""Every service of deploy/services.yaml, the one list."""


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


def wait_serving(name: str, port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until the process on `port` reports SERVING (grpc.health.v1)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{name}: exited with code {proc.returncode} during start-up (see its log above)")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"{name}: not SERVING after {timeout:.0f} s")


def configured(svc: Service) -> Service:
    """The service with ports taken from the environment when set (`FRAUD_GRPC_PORT`, ...)."""
    p = svc.env_prefix
    return replace(svc, grpc_port=int(os.environ.get(f"{p}GRPC_PORT", svc.grpc_port)),
                   metrics_port=int(os.environ.get(f"{p}METRICS_PORT", svc.metrics_port)))


def start_service(svc: Service, replica: int, repo: Path, redis_url: str | None,
                  procs: list[subprocess.Popen]) -> int:
    """Start one replica of a service and wait until SERVING; returns its gRPC port."""
    grpc_port, metrics_port = svc.grpc_port + 100 * replica, svc.metrics_port + 100 * replica
    p = svc.env_prefix
    env = {**svc.env(), **os.environ, f"{p}MODEL_REPOSITORY": str(repo), f"{p}GRPC_PORT": str(grpc_port),
           f"{p}METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1"}
    # Behind the gateway: keep answering for a moment after NOT_SERVING, so that Envoy's
    # health check (1 s interval) takes the replica out of rotation before it stops.
    env.setdefault(f"{p}DRAIN_DELAY_S", "2")
    if redis_url:
        env["REDIS_URL"] = redis_url
    proc = subprocess.Popen([PY, "-m", svc.module], env=env, cwd=ROOT)
    procs.append(proc)
    name = svc.name if replica == 0 else f"{svc.name}[{replica}]"
    wait_serving(name, grpc_port, proc)
    print(f"{name}: SERVING on 127.0.0.1:{grpc_port} (metrics :{metrics_port})")
    return grpc_port


def start_gateway(port: int, admin_port: int, endpoints: dict[str, list[str]],
                  procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Render the local gateway config, start Envoy, wait until every upstream host is healthy."""
    jwks = auth.ensure_dev_keys(gateway.DEFAULT_KEY_DIR).jwks_path
    files = gateway.prepare_files_dir(ROOT / ".run" / "gateway", jwks)
    path = files / "envoy.yaml"
    path.write_text(gateway.render_local(files, port, admin_port, endpoints, files / "access.log"))
    proc = subprocess.Popen(gateway.envoy_command(path), cwd=ROOT)
    procs.append(proc)
    hosts = sum(len(v) for v in endpoints.values())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway: envoy exited with code {proc.returncode} (config: {path})")
        try:
            healthy = gateway.healthy_hosts(admin_port, endpoints)
            if gateway.is_live(admin_port) and healthy == hosts:
                print(f"gateway: Envoy on 127.0.0.1:{port} (admin 127.0.0.1:{admin_port}), "
                      f"{healthy}/{hosts} upstream hosts healthy")
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"gateway: not ready with all {hosts} upstream hosts healthy after {timeout:.0f} s")


def sentiment_usage(gateway_port: int) -> str:
    """How to call the sentiment service (REST, gRPC, OIP), when it is one of SERVICES."""
    svc = next((configured(s) for s in SERVICES if s.name == "sentiment"), None)
    if svc is None:
        return ""
    return f"""
  # Sentiment (REST through the gateway; batch: /api/v1/sentiment:batch with {{"texts": [...]}}):
  curl -s http://127.0.0.1:{gateway_port}/api/v1/sentiment -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d '{{"text": "Not bad at all, I would buy it again."}}'
  grpcurl -plaintext -d '{{"text": "The support team never called back."}}' \\
    127.0.0.1:{svc.grpc_port} sentiment.v1.SentimentService/Predict
  # OIP v2: model "sentiment", BYTES input "text" at 127.0.0.1:{svc.grpc_port}; metrics :{svc.metrics_port}
"""


def usage(repo: Path, fraud: Service, gateway_port: int, admin_port: int) -> str:
    sample = json.loads((repo / "fraud" / "1" / "sample.json").read_text())
    features = sample["rows"][0]["features"]
    payload = json.dumps({"transaction": {"transaction_id": "tx-1", "features": features}})
    token = auth.mint_token(auth.ensure_dev_keys(gateway.DEFAULT_KEY_DIR), "dev-user")
    return f"""
The platform is up. Call it:

  # REST through the gateway (JWT required; `make token SUB=alice` prints another token):
  TOKEN={token}
  curl -s http://127.0.0.1:{gateway_port}/api/v1/fraud -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d '{payload}'

  # gRPC through the gateway (same port), or straight to the service on {fraud.grpc_port}:
  grpcurl -plaintext -H "Authorization: Bearer $TOKEN" -d '{payload}' \\
    127.0.0.1:{gateway_port} fraud.v1.FraudService/Predict

  # Python, typed API, straight to the service:
  {PY} - <<'PY'
import grpc
from fraud.v1 import fraud_pb2 as pb, fraud_pb2_grpc as rpc
stub = rpc.FraudServiceStub(grpc.insecure_channel("127.0.0.1:{fraud.grpc_port}"))
tx = pb.Transaction(transaction_id="tx-1", features={features})
print(stub.Predict(pb.PredictRequest(transaction=tx)))
PY

  # Open Inference Protocol v2 (tritonclient, perf_analyzer, KServe SDK): model "fraud" at 127.0.0.1:{fraud.grpc_port}
  # Metrics: curl -s http://127.0.0.1:{fraud.metrics_port}/metrics | grep ^inference_
  #          curl -s http://127.0.0.1:{admin_port}/stats/prometheus   (gateway)
  # Gateway access log (JSON lines): {ROOT / '.run' / 'gateway' / 'access.log'}

{cnn_usage(repo, gateway_port)}

{sentiment_usage(gateway_port)}
{config_only_usage(repo, gateway_port)}
Limits: 100 requests per minute per API key (the token's `sub`).
Feature order and valid ranges: {repo / 'fraud' / '1' / 'config.json'} (parameters.features).
Press Ctrl-C to stop everything.
"""


def config_only_usage(repo: Path, gateway_port: int) -> str:
    """How to call each config-only model (the generic service): REST through the gateway and OIP."""
    lines = []
    for svc in (configured(s) for s in SERVICES if s.config_only):
        for model in svc.models:
            spec = ModelRepository(repo).resolve(model).config.inputs[0]
            sample = repo / model / str(ModelRepository(repo).versions(model)[-1]) / "sample.json"
            values = json.loads(sample.read_text())["rows"][0][spec.name] if sample.is_file() else []
            body = json.dumps({"inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": [1, len(values)],
                                           "contents": {f"{spec.datatype.lower()}_contents": values}}]})
            where = f"127.0.0.1:{svc.grpc_port}, OIP; metrics :{svc.metrics_port}"
            lines.append(f"""  # {model} (config-only, generic service on {where}):
  curl -s http://127.0.0.1:{gateway_port}/api/v1/{model} -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d '{body}'""")
    return "\n".join(lines) + "\n" if lines else ""


def cnn_usage(repo: Path, gateway_port: int) -> str:
    """How to call the cnn service (digit images), with the sample image of its newest version."""
    cnn = configured(next(svc for svc in SERVICES if svc.name == "cnn"))
    versions = ModelRepository(repo).versions("cnn")
    sample = repo / "cnn" / str(versions[-1] if versions else 1) / "sample.png"
    return f"""  # cnn: classify a digit image (PNG/JPEG/BMP, base64 in JSON; bright ink on dark), top 3 classes:
  curl -s http://127.0.0.1:{gateway_port}/api/v1/cnn -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d "{{\\"image\\": \\"$(base64 -w0 {sample})\\", \\"top_k\\": 3}}"
  # batches: POST /api/v1/cnn:batch {{"inputs": [{{"image": "..."}}, ...]}}; gRPC cnn.v1.CnnService on
  # 127.0.0.1:{cnn.grpc_port} (or the gateway); OIP model "cnn": input "image" FP32 [N, 1, 32, 32], pixels 0-255.
  # Metrics (batch sizes, queue wait): curl -s http://127.0.0.1:{cnn.metrics_port}/metrics | grep ^inference_batch
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    parser.add_argument("--gateway-port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8080")))
    parser.add_argument("--gateway-admin-port", type=int,
                        default=int(os.environ.get("GATEWAY_ADMIN_PORT", "9901")))
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "1")),
                        help="processes per service behind the gateway")
    parser.add_argument("--no-wait", action="store_true", help="exit once everything is healthy (for smoke tests)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")

    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        redis_url = start_redis(args.redis_port, procs)
        services = [configured(svc) for svc in SERVICES]
        endpoints = {
            svc.name: [f"127.0.0.1:{start_service(svc, i, args.model_repository, redis_url, procs)}"
                       for i in range(args.replicas)]
            for svc in services
        }
        start_gateway(args.gateway_port, args.gateway_admin_port, endpoints, procs)
        print(usage(args.model_repository, services[0], args.gateway_port, args.gateway_admin_port), flush=True)
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
