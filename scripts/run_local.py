"""`make run`: start the platform locally (Redis, every service, the Envoy gateway), wait until all are healthy,
print how to call it, keep it running, roll its replicas on `make rollout`, and stop everything on Ctrl-C.

Redis is started when `redis-server` is installed (or reused when something already answers on the Redis port,
and then left alone); without it the services fall back to their in-process cache. `--replicas N` (REPLICAS)
starts N processes per service behind the gateway's health-checked cluster; `--services fraud,cnn` starts only
those. Gateway: `GATEWAY_PORT` (8080) and `GATEWAY_ADMIN_PORT` (9901, loopback); its JSON access log goes to
.run/gateway/access.log.

`TLS=1` (--tls): the gateway serves HTTPS and gRPC over TLS with the dev certificate. `MTLS=1` (--mtls): mutual
TLS from the gateway to the services with the dev internal CA (`keys` makes both); a service's own port then
wants a client certificate, and its health alone answers in plaintext on the port + 50.

`OBSERVABILITY=1` (--observability) also starts Debian's Prometheus (`prometheus`, from `make system-deps`) on
PROMETHEUS_PORT (9090, loopback): monitoring/prometheus.yml's jobs scraping every service slot's metrics port and
Envoy's /stats/prometheus on the admin port, with monitoring/alerts.yaml's rules loaded (scripts/observability.py).

Supervision (scripts/supervise.py): a replica, Redis (when started here) or Envoy that dies is restarted on its
own port with backoff (0.5 s doubling to 10 s, reset after 30 s of health) and the rest keep serving; only
Ctrl-C or SIGTERM stops everything: the gateway (drained first: no call in flight is cut), then the services,
then Redis.

Port slots: each service has REPLICAS + 1 of them in the gateway's cluster, slot i on the service's ports
+ 100·i; replica i starts on slot i and one slot stays free. `make rollout` (scripts/rollout.py, over the control
socket .run/supervisor.sock) starts a new replica on the free slot, waits until it is SERVING and the gateway
routes to it, drains the old one (SIGUSR1: NOT_SERVING, still answering) until the gateway has taken it out of
rotation with nothing in flight, stops it, and goes on with the next replica: no request fails.
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlplatform_gateway import auth
from mlplatform_gateway import local as gateway
from mlplatform_gateway import tls as gateway_tls

from mlplatform.launch import grpc_serving
from mlplatform.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))
from observability import PrometheusServer, local_config  # noqa: E402
from supervise import ControlError, ControlServer, StartError, Supervised, exit_reason  # noqa: E402

from deploy import catalog  # noqa: E402  (the repository root holds the service list)
from deploy.catalog import HEALTH_PORT_OFFSET, Service  # noqa: E402

SERVICES = catalog.services()
"""Every service of deploy/services.yaml, the one list."""

CONTROL_SOCKET = ROOT / ".run" / "supervisor.sock"
"""Where a running make run answers `make rollout` (RUN_CONTROL_SOCKET, --control-socket)."""
SLOT_STRIDE = 100
"""Slot i of a service listens on its ports + SLOT_STRIDE·i."""
SERVICE_START_TIMEOUT_S = 180.0
GATEWAY_ROUTES_TIMEOUT_S = 30.0
"""How long a rollout waits for the gateway to mark the new replica healthy."""
DRAIN_TIMEOUT_S = 30.0
"""How long a rollout waits for the gateway to take a drained replica out of rotation with nothing in flight
(a long bidi stream can hold it); after that the replica is stopped anyway (SIGTERM: its grace period)."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def configured(svc: Service) -> Service:
    """The service with ports taken from the environment when set (`FRAUD_GRPC_PORT`, ...)."""
    p = svc.env_prefix
    return replace(svc, grpc_port=int(os.environ.get(f"{p}GRPC_PORT", svc.grpc_port)),
                   metrics_port=int(os.environ.get(f"{p}METRICS_PORT", svc.metrics_port)))


@dataclass
class ServiceSlots:
    """A service's port slots behind the gateway, each empty or holding one replica; one is always free (the
    rollout's "surge" slot), and which one rotates as replicas are rolled. An empty slot fails its health
    check, so the gateway sends it nothing (healthy_panic_threshold 0)."""

    svc: Service
    slots: list[Supervised | None]

    def port(self, slot: int) -> int:
        return self.svc.grpc_port + SLOT_STRIDE * slot

    def metrics_port(self, slot: int) -> int:
        return self.svc.metrics_port + SLOT_STRIDE * slot

    def host(self, slot: int) -> str:
        return f"127.0.0.1:{self.port(slot)}"

    def name(self, slot: int) -> str:
        return self.svc.name if slot == 0 else f"{self.svc.name}[{slot}]"

    def endpoints(self) -> list[str]:
        return [self.host(slot) for slot in range(len(self.slots))]

    def occupied(self) -> list[int]:
        return [slot for slot, proc in enumerate(self.slots) if proc is not None]

    def free(self) -> int:
        return self.slots.index(None)


class Stack:
    """The processes of one make run: Redis (when started here), each service's replicas, the gateway."""

    def __init__(self, repo: Path, services: list[Service], replicas: int, gateway_port: int,
                 admin_port: int, tls: bool = False, mtls: bool = False) -> None:
        self.repo = repo
        self.tls = tls
        """The gateway serves TLS (REST over https, gRPC over TLS) with the dev certificate (TLS=1)."""
        self.mtls = gateway_tls.ensure_dev_mtls(gateway.DEFAULT_KEY_DIR, [svc.name for svc in services]) \
            if mtls else None
        """Mutual TLS from the gateway to the services (MTLS=1): the dev internal CA's certificates."""
        self.groups = {svc.name: ServiceSlots(svc, [None] * (replicas + 1)) for svc in services}
        self.gateway_port, self.admin_port = gateway_port, admin_port
        self.stopping = threading.Event()
        self.up = threading.Event()
        """Set once everything has started: rollouts wait for it."""
        self.redis: Supervised | None = None
        self.redis_url: str | None = None
        self.redis_dir: str | None = None
        self.gateway: Supervised | None = None
        self.prometheus: PrometheusServer | None = None
        self._slots_lock = threading.Lock()
        self._rolling = threading.Lock()

    # -- start-up ---------------------------------------------------------------------------------------------

    def start_redis(self, port: int) -> None:
        """Use the Redis on `port`, or start (and supervise) one when redis-server is installed."""
        url = f"redis://127.0.0.1:{port}/0"
        if port_open(port):
            print(f"redis: something already listens on {port}; using it as the cache (not supervised)")
            self.redis_url = url
            return
        binary = shutil.which("redis-server")
        if binary is None:
            print("redis: redis-server not installed; services use their in-process LRU cache "
                  "(apt-get install redis-server to get the shared cache)")
            return
        self.redis_dir = tempfile.mkdtemp(prefix="mlplatform-redis-")
        self.redis = Supervised(
            "redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", self.redis_dir],
            ready=lambda: port_open(port), ready_message=f"listening on 127.0.0.1:{port}",
            stdout=subprocess.DEVNULL, halt=self.stopping)
        try:
            self.redis.start(timeout=10)
        except StartError as exc:
            raise StartError(f"{exc} (within 10 s)") from exc
        print(f"redis: started on 127.0.0.1:{port}")
        self.redis_url = url

    def materialize_features(self) -> None:
        """Fill the fraud feature store (Redis) with the synthetic cards, so fraud scores by `card_id`."""
        if self.redis_url is None or "fraud" not in self.groups:
            return
        done = subprocess.run([PY, "-m", "fraud_service.materialize", "--redis-url", self.redis_url], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        print((done.stdout or done.stderr).strip() or f"materialize: exit {done.returncode}", flush=True)

    def replica(self, group: ServiceSlots, slot: int) -> Supervised:
        """A replica of the service on `slot`'s ports (not started)."""
        svc, port = group.svc, group.port(slot)
        p = svc.env_prefix
        env = {**svc.env(), **os.environ, f"{p}MODEL_REPOSITORY": str(self.repo), f"{p}GRPC_PORT": str(port),
               f"{p}METRICS_PORT": str(group.metrics_port(slot)), "PYTHONUNBUFFERED": "1"}
        # Stopped without a drain first (Ctrl-C): keep answering for a moment after NOT_SERVING, so that
        # Envoy's health check (1 s interval) takes the replica out of rotation before it stops.
        env.setdefault(f"{p}DRAIN_DELAY_S", "2")
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        health_port = port
        if self.mtls is not None:  # TLS only on the gRPC port, a client certificate required; health beside it
            health_port = port + HEALTH_PORT_OFFSET
            env.update({f"{p}TLS_CERT_FILE": str(self.mtls.services.cert),
                        f"{p}TLS_KEY_FILE": str(self.mtls.services.key),
                        f"{p}TLS_CLIENT_CA_FILE": str(self.mtls.services.ca), f"{p}HEALTH_PORT": str(health_port)})
        return Supervised(group.name(slot), [PY, "-m", svc.module], env=env, cwd=ROOT,
                          ready=lambda: grpc_serving(health_port), ready_message=f"SERVING on 127.0.0.1:{port}",
                          halt=self.stopping)

    def start_replica(self, group: ServiceSlots, slot: int) -> Supervised:
        """Start a replica on `slot` and wait until it is SERVING; StartError (slot empty again) otherwise."""
        proc = self.replica(group, slot)
        with self._slots_lock:
            group.slots[slot] = proc
        try:
            proc.start(SERVICE_START_TIMEOUT_S)
        except StartError:
            with self._slots_lock:
                group.slots[slot] = None
            raise
        print(f"{proc.name}: SERVING on 127.0.0.1:{group.port(slot)} (metrics :{group.metrics_port(slot)})",
              flush=True)
        return proc

    def start_gateway(self, timeout: float = 30.0) -> None:
        """Render the local gateway config (every slot of every service), start Envoy, wait until every occupied
        slot's host is healthy."""
        jwks = auth.ensure_dev_keys(gateway.DEFAULT_KEY_DIR).jwks_path
        files = gateway.prepare_files_dir(ROOT / ".run" / "gateway", jwks)
        path = files / "envoy.yaml"
        endpoints = {name: group.endpoints() for name, group in self.groups.items()}
        certs = gateway_tls.ensure_dev_tls(gateway.DEFAULT_KEY_DIR) if self.tls else None
        overrides: dict[str, Any] = {"tls": {"enabled": True, "dir": str(certs.directory)}} if certs else {}
        if self.mtls is not None:
            overrides["upstreams"] = {"tls": {"enabled": True, "dir": str(self.mtls.gateway.directory)}}
        path.write_text(gateway.render_local(files, self.gateway_port, self.admin_port, endpoints,
                                             files / "access.log", overrides))
        self.gateway = Supervised("gateway", gateway.envoy_command(path, drain_time_s=gateway.DRAIN_TIME_S), cwd=ROOT,
                                  ready=lambda: self._envoy_live(), ready_message=f"Envoy on 127.0.0.1:"
                                  f"{self.gateway_port}", halt=self.stopping)
        try:
            self.gateway.start(timeout)
        except StartError as exc:
            raise StartError(f"{exc} (config: {path})") from exc
        hosts = sum(len(group.occupied()) for group in self.groups.values())
        free = len(self.groups)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                healthy = gateway.healthy_hosts(self.admin_port, self.groups)
            except OSError:
                healthy = -1
            if healthy == hosts:
                print(f"gateway: Envoy on 127.0.0.1:{self.gateway_port} (admin 127.0.0.1:{self.admin_port}), "
                      f"{healthy}/{hosts} upstream hosts healthy (+{free} free slots for rollouts)")
                return
            time.sleep(0.1)
        if self.stopping.is_set():
            raise StartError("gateway: start-up interrupted")
        raise StartError(f"gateway: not ready with all {hosts} upstream hosts healthy after {timeout:.0f} s")

    def start_prometheus(self, port: int) -> None:
        """Debian's Prometheus on `port` scraping every slot of every service (an empty slot shows as down) and
        Envoy's admin /stats/prometheus, with the platform's rules; skipped with a note when not installed."""
        if shutil.which("prometheus") is None:
            print("prometheus: not installed (make system-deps, or apt-get install prometheus); not started")
            return
        targets = {"model-services": [f"127.0.0.1:{group.metrics_port(slot)}" for group in self.groups.values()
                                      for slot in range(len(group.slots))],
                   "gateway": [f"127.0.0.1:{self.admin_port}"]}
        try:
            self.prometheus = PrometheusServer(local_config(targets), port=port).start()
        except RuntimeError as exc:
            raise StartError(f"prometheus: {exc}") from exc
        print(f"prometheus: {self.prometheus.url} (alerts: {self.prometheus.url}/alerts), scraping "
              f"{sum(map(len, targets.values()))} targets, rules monitoring/alerts.yaml", flush=True)

    def _envoy_live(self) -> bool:
        try:
            return gateway.is_live(self.admin_port)
        except OSError:
            return False

    # -- control: status and rollouts ---------------------------------------------------------------------------

    def status(self, request: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
        """Every supervised process: name, pid, alive, ready, restarts (and a replica's slot and port)."""
        with self._slots_lock:
            services = {name: [{**proc.status(), "slot": slot, "port": group.port(slot)}
                               for slot, proc in enumerate(group.slots) if proc is not None]
                        for name, group in self.groups.items()}
        return {"services": services, "redis": self.redis.status() if self.redis else None,
                "gateway": self.gateway.status() if self.gateway else None,
                "gateway_port": self.gateway_port, "admin_port": self.admin_port}

    def rollout(self, request: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
        """Replace every replica (of `request["service"]`, else of every service), one at a time, drained first."""
        name = request.get("service")
        if not self.up.is_set():
            raise ControlError("make run is still starting; try again once it says the platform is up")
        if name and name not in self.groups:
            raise ControlError(f"unknown service {name!r}; this make run runs {', '.join(self.groups)}")
        if not self._rolling.acquire(blocking=False):
            raise ControlError("a rollout is already in progress")
        try:
            groups = [self.groups[name]] if name else list(self.groups.values())
            rolled = []
            for group in groups:
                slots = group.occupied()
                for n, slot in enumerate(slots, 1):
                    say(f"{group.svc.name}: replica {n}/{len(slots)}")
                    rolled.append(self._roll(group, slot, say))
            say(f"rollout done: {len(rolled)} replica(s) replaced")
            return {"rolled": rolled}
        finally:
            self._rolling.release()

    def _roll(self, group: ServiceSlots, old_slot: int, say: Callable[[str], None]) -> dict[str, Any]:
        """One replica: new one on the free slot, SERVING and routed to; old one drained, out of rotation, stopped.
        The old replica is never touched before its replacement is healthy in the gateway."""
        old = group.slots[old_slot]
        assert old is not None
        new_slot = group.free()
        say(f"{group.name(new_slot)}: starting on 127.0.0.1:{group.port(new_slot)} to replace {old.name} "
            f"(pid {old.pid})")
        try:
            new = self.start_replica(group, new_slot)
        except StartError as exc:
            raise ControlError(f"{exc}; {old.name} keeps serving, rollout stopped") from exc
        say(f"{new.name}: SERVING (pid {new.pid}); waiting for the gateway to route to it")
        if self._wait_host(group, new_slot, lambda h: h.healthy, GATEWAY_ROUTES_TIMEOUT_S) is None:
            new.stop(30)
            with self._slots_lock:
                group.slots[new_slot] = None
            raise ControlError(f"the gateway did not mark {new.name} healthy within {GATEWAY_ROUTES_TIMEOUT_S:g} s; "
                               f"stopped it, {old.name} keeps serving, rollout stopped")
        old.retire()  # whatever happens to it now, it is not restarted
        if old.alive:
            say(f"{old.name}: draining (SIGUSR1: NOT_SERVING, still answering); waiting for the gateway to take "
                "it out of rotation")
            old.signal(signal.SIGUSR1)
            drained = self._wait_host(group, old_slot, lambda h: h.failed_active_hc and h.rq_active == 0,
                                      DRAIN_TIMEOUT_S)
            if drained is None:
                say(f"{old.name}: still in rotation or busy after {DRAIN_TIMEOUT_S:g} s; stopping it anyway")
            else:
                say(f"{old.name}: out of rotation, nothing in flight; stopping it (SIGTERM)")
        code = old.stop(30)
        with self._slots_lock:
            group.slots[old_slot] = None
        say(f"{old.name} (pid {old.pid}) {exit_reason(code)}; {new.name} (pid {new.pid}) serves in its place")
        return {"service": group.svc.name, "old": {"name": old.name, "pid": old.pid, "port": group.port(old_slot)},
                "new": {"name": new.name, "pid": new.pid, "port": group.port(new_slot)}}

    def _wait_host(self, group: ServiceSlots, slot: int, want: Callable[[gateway.HostStatus], bool],
                   timeout: float) -> gateway.HostStatus | None:
        """Until the gateway shows the slot's host as `want`s it; None after `timeout` s."""
        key = (group.svc.name, group.host(slot))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                raise ControlError("make run is stopping; rollout abandoned")
            try:
                status = gateway.host_statuses(self.admin_port).get(key)
            except OSError:
                status = None  # the gateway is being restarted
            if status is not None and want(status):
                return status
            time.sleep(0.1)
        return None

    # -- stop ---------------------------------------------------------------------------------------------------

    def stop_gateway(self) -> None:
        """Drain Envoy (`mlplatform_gateway.local.drain`: health check failed, listeners drained, until no client
        connection is left, at most its drain time), then SIGTERM it: on a bare SIGTERM Envoy closes its listeners
        and resets every call in flight."""
        assert self.gateway is not None
        if self.gateway.alive:
            try:
                result = gateway.drain(self.admin_port, gateway.DRAIN_TIME_S)
                left = f", {result.connections_left} client connection(s) still open" if result.connections_left else ""
                print(f"gateway: drained in {result.waited_s:.1f} s{left}", flush=True)
            except OSError as exc:
                print(f"gateway: no drain ({exc}); stopping it", flush=True)
        self.gateway.stop(10)

    def shutdown(self) -> None:
        """Orderly: the gateway, then every replica (in parallel, each drains), then Redis."""
        self.stopping.set()
        print("stopping...", flush=True)
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.gateway is not None:
            self.stop_gateway()
        with self._slots_lock:
            replicas = [proc for group in self.groups.values() for proc in group.slots if proc is not None]
        for proc in replicas:
            proc.terminate()
        for proc in replicas:
            proc.wait(30)
        if self.redis is not None:
            self.redis.stop(10)
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)
        print("stopped.", flush=True)


def sentiment_usage(svc: Service, gateway_port: int) -> str:
    """How to call the sentiment service (REST, gRPC, OIP)."""
    return f"""
  # Sentiment (REST through the gateway; batch: /api/v1/sentiment:batch with {{"texts": [...]}}):
  curl -s http://127.0.0.1:{gateway_port}/api/v1/sentiment -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d '{{"text": "Not bad at all, I would buy it again."}}'
  grpcurl -plaintext -d '{{"text": "The support team never called back."}}' \\
    127.0.0.1:{svc.grpc_port} sentiment.v1.SentimentService/Predict
  # OIP v2: model "sentiment", BYTES input "text" at 127.0.0.1:{svc.grpc_port}; metrics :{svc.metrics_port}
"""


def fraud_usage(repo: Path, fraud: Service, gateway_port: int, admin_port: int) -> str:
    """How to call the fraud service: REST and gRPC through the gateway, Python and OIP straight to it (follows
    the TOKEN line)."""
    sample = json.loads((repo / "fraud" / "1" / "sample.json").read_text())
    features = sample["rows"][0]["features"]
    payload = json.dumps({"transaction": {"transaction_id": "tx-1", "features": features}})
    by_card = json.dumps({"transaction": {"transaction_id": "tx-2", "card_id": "card-000042", "amount": 84.5,
                                          "merchant_category": "5732", "merchant_country": "FR",
                                          "latitude": 48.85, "longitude": 2.35, "channel": "ONLINE"}})
    return f"""  curl -s http://127.0.0.1:{gateway_port}/api/v1/fraud -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d '{payload}'

  # By card: the transaction's own fields, the card's aggregates from the online feature store (Redis);
  # audit log: redis-cli XRANGE fraud:audit - + COUNT 10
  curl -s http://127.0.0.1:{gateway_port}/api/v1/fraud -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d '{by_card}'

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
"""


def usage(repo: Path, running: dict[str, Service], gateway_port: int, admin_port: int) -> str:
    """What make run prints once the platform is up: a token and a call for each running service."""
    token = auth.mint_token(auth.ensure_dev_keys(gateway.DEFAULT_KEY_DIR), "dev-user")
    fraud = running.get("fraud")
    cnn = running.get("cnn")
    sentiment = running.get("sentiment")
    config_only = [svc for svc in running.values() if svc.config_only]
    return f"""
The platform is up. Call it:

  # REST through the gateway (JWT required; `make token SUB=alice` prints another token):
  TOKEN={token}
{fraud_usage(repo, fraud, gateway_port, admin_port) if fraud else ""}\
  # Gateway access log (JSON lines): {ROOT / '.run' / 'gateway' / 'access.log'}

{cnn_usage(repo, cnn, gateway_port) if cnn else ""}
{sentiment_usage(sentiment, gateway_port) if sentiment else ""}
{config_only_usage(repo, config_only, gateway_port)}
Limits: 100 requests per minute per API key (the token's `sub`).
{f"Feature order and valid ranges: {repo / 'fraud' / '1' / 'config.json'} (parameters.features)." if fraud else ""}
A process that dies is restarted. New code or models: `make rollout` (SERVICE=<name> for one service) replaces
every replica, one at a time, drained first: no request fails.
Press Ctrl-C to stop everything.
"""


def config_only_usage(repo: Path, services: list[Service], gateway_port: int) -> str:
    """How to call each config-only model (the generic service): REST through the gateway and OIP."""
    lines = []
    for svc in services:
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


def cnn_usage(repo: Path, cnn: Service, gateway_port: int) -> str:
    """How to call the cnn service (digit images), with the sample image of its newest version."""
    versions = ModelRepository(repo).versions("cnn")
    sample = repo / "cnn" / str(versions[-1] if versions else 1) / "sample.png"
    return f"""  # cnn: classify a digit image (PNG/JPEG/BMP, base64 in JSON; bright ink on dark), top 3 classes:
  curl -s http://127.0.0.1:{gateway_port}/api/v1/cnn -H "Authorization: Bearer $TOKEN" \\
    -H 'content-type: application/json' -d "{{\\"image\\": \\"$(base64 -w0 {sample})\\", \\"top_k\\": 3}}"
  # batches: POST /api/v1/cnn:batch {{"inputs": [{{"image": "..."}}, ...]}}; gRPC cnn.v1.CnnService on
  # 127.0.0.1:{cnn.grpc_port} (or the gateway); OIP model "cnn": input "image" FP32 [N, 1, 32, 32], pixels 0-255.
  # Metrics (batch sizes, queue wait): curl -s http://127.0.0.1:{cnn.metrics_port}/metrics | grep ^inference_batch
"""


def selected_services(names: str | None) -> list[Service]:
    """The services of deploy/services.yaml named in `names` (comma-separated; None: all), ports configured."""
    if not names:
        return [configured(svc) for svc in SERVICES]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {svc.name: svc for svc in SERVICES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--services: unknown {', '.join(unknown)}; services: {', '.join(known)}")
    return [configured(svc) for svc in SERVICES if svc.name in wanted]


def tls_usage(text: str, gateway_port: int) -> str:
    """`usage` for a TLS gateway: https with the dev CA for curl, TLS for grpcurl."""
    ca = gateway_tls.ensure_dev_tls(gateway.DEFAULT_KEY_DIR).ca
    text = text.replace(f"curl -s http://127.0.0.1:{gateway_port}",
                        f"curl -s --cacert {ca} https://localhost:{gateway_port}")
    lines = text.splitlines()
    for i, line in enumerate(lines):  # grpcurl to the gateway: TLS with the dev CA (a service's port stays plaintext)
        if line.strip().startswith("grpcurl -plaintext") and i + 1 < len(lines) \
                and lines[i + 1].strip().startswith(f"127.0.0.1:{gateway_port} "):
            lines[i] = line.replace("grpcurl -plaintext", f"grpcurl -cacert {ca}")
            lines[i + 1] = lines[i + 1].replace(f"127.0.0.1:{gateway_port}", f"localhost:{gateway_port}")
    return "\n".join(lines) + "\n" + f"  # TLS: the dev CA is {ca}; plaintext http:// to the gateway gets a redirect.\n"


def mtls_usage(material: gateway_tls.DevMtls, services: list[Service]) -> str:
    """What changes with MTLS=1: the services' own ports want a client certificate of the internal CA."""
    first = services[0]
    return f"""

  # mTLS (MTLS=1): the gateway presents {material.gateway.cert} to the services, whose ports now serve TLS
  # only and require a client certificate of the dev internal CA ({material.services.ca}); calls through the
  # gateway are unchanged. Straight to a service (health alone, plaintext, on its port + {HEALTH_PORT_OFFSET}):
  grpcurl -cacert {material.services.ca} -cert {material.gateway.cert} -key {material.gateway.key} \\
    -servername {first.name} 127.0.0.1:{first.grpc_port} list
  grpcurl -plaintext 127.0.0.1:{first.grpc_port + HEALTH_PORT_OFFSET} grpc.health.v1.Health/Check
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    parser.add_argument("--gateway-port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8080")))
    parser.add_argument("--gateway-admin-port", type=int,
                        default=int(os.environ.get("GATEWAY_ADMIN_PORT", "9901")))
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "1")),
                        help="processes per service behind the gateway")
    parser.add_argument("--services", help="comma-separated services to start (default: every one of "
                        "deploy/services.yaml)")
    parser.add_argument("--control-socket", type=Path,
                        default=Path(os.environ.get("RUN_CONTROL_SOCKET", CONTROL_SOCKET)),
                        help="unix socket `make rollout` talks to (default: .run/supervisor.sock)")
    parser.add_argument("--observability", action="store_true", default=os.environ.get("OBSERVABILITY", "") not in
                        ("", "0", "false"), help="also start Prometheus with the platform's rules (OBSERVABILITY=1)")
    parser.add_argument("--prometheus-port", type=int, default=int(os.environ.get("PROMETHEUS_PORT", "9090")))
    parser.add_argument("--tls", action="store_true", default=os.environ.get("TLS", "") not in ("", "0", "false"),
                        help="the gateway serves TLS with the dev certificate (TLS=1); plaintext is redirected")
    parser.add_argument("--mtls", action="store_true", default=os.environ.get("MTLS", "") not in ("", "0", "false"),
                        help="mutual TLS from the gateway to the services with the dev internal CA (MTLS=1)")
    parser.add_argument("--no-wait", action="store_true", help="exit once everything is healthy (for smoke tests)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    services = selected_services(args.services)
    stack = Stack(args.model_repository, services, args.replicas, args.gateway_port, args.gateway_admin_port,
                  tls=args.tls, mtls=args.mtls)

    def stop(*_: object) -> None:
        stack.stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    control = ControlServer(args.control_socket, {"status": stack.status, "rollout": stack.rollout})
    try:
        stack.start_redis(args.redis_port)
        stack.materialize_features()
        for group in stack.groups.values():
            for slot in range(args.replicas):
                stack.start_replica(group, slot)
        stack.start_gateway()
        if args.observability:
            stack.start_prometheus(args.prometheus_port)
        stack.up.set()
        text = usage(args.model_repository, {svc.name: svc for svc in services}, args.gateway_port,
                     args.gateway_admin_port)
        text = tls_usage(text, args.gateway_port) if args.tls else text
        if stack.mtls is not None:  # before the closing "Press Ctrl-C" line
            head, sep, tail = text.rpartition("\nPress Ctrl-C")
            text = head + mtls_usage(stack.mtls, services) + sep + tail if sep else text + mtls_usage(
                stack.mtls, services)
        print(text, flush=True)
        while not stack.stopping.is_set() and not args.no_wait:
            time.sleep(0.2)
        return 0
    except StartError as exc:
        if stack.stopping.is_set():
            return 0  # Ctrl-C during start-up
        raise SystemExit(str(exc)) from exc
    finally:
        control.close()
        stack.shutdown()


if __name__ == "__main__":
    sys.exit(main())
