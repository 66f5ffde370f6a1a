"""Stopping the gateway under load loses nothing: `GatewayProcess.stop()` drains Envoy first
(`mlplatform_gateway.local.drain`, the code `make run`'s stop and the Kubernetes preStop hook run), then SIGTERMs it.

The load: REST over keep-alive connections, unary gRPC on one channel, and one bidi stream open across the stop.
The clients keep sending for `KEEP_SENDING_S` after the stop begins (in Kubernetes: until the pod's removal from
the endpoints reaches them), and reconnect when told to (`Connection: close`, GOAWAY); then they stop and close.

Measured here (2 cores, 5 clients at ~50 calls/s each plus the stream, 4 s drain window, two runs each): with the
drain, 0 failed of ~465 calls (~270 of them started during the drain), the stream answered every message, and
Envoy got its SIGTERM 1.6 s after the drain began (once the last client connection closed). With a bare SIGTERM
at the same moment (the behaviour before the fix), Envoy exited 17-68 ms later: the open stream was reset
(UNAVAILABLE "Stream removed"), 3 REST calls on kept-alive connections broke (BrokenPipe / RemoteDisconnected),
and the 354 calls of the next 1.5 s were refused; `test_bare_sigterm_loses_calls` keeps that as the check that
this load does catch lost calls.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import auth

from tests.fraud.helpers import tx
from tests.gateway.helpers import bearer
from tests.support.procs import ROOT, GatewayProcess, ServiceProcess

pytestmark = pytest.mark.integration

STEADY_S = 1.0
"""Load before the stop begins."""
KEEP_SENDING_S = 1.5
"""Load after the stop begins (clients still sending while the gateway drains)."""
DRAIN_TIME_S = 4
"""The gateway's --drain-time-s here (longer than KEEP_SENDING_S: the listener must still accept then)."""
PAUSE_S = 0.02
"""Between one client's calls: ~50 calls/s per client."""


@dataclass
class Calls:
    """Every call's outcome, with its start time (monotonic)."""

    ok: list[float] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, start: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok.append(start)
            else:
                self.failed.append((start, error))


def rest_client(gw: GatewayProcess, token: str, features: list[float], stop: threading.Event, calls: Calls) -> None:
    """Keep-alive HTTP/1.1 calls; a new connection after `Connection: close` (Envoy's drain) or an error."""
    body = json.dumps({"transaction": {"transaction_id": "d", "features": features}})
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        start = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            conn.request("POST", "/api/v1/fraud", body, headers)
            resp = conn.getresponse()
            resp.read()
            calls.record(start, None if resp.status == 200 else f"REST {resp.status}")
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            calls.record(start, f"REST {type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(PAUSE_S)
    if conn is not None:
        conn.close()


def grpc_client(stub: rpc.FraudServiceStub, token: str, features: list[float], stop: threading.Event,
                calls: Calls) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            stub.Predict(pb.PredictRequest(transaction=tx(features, "g")), metadata=bearer(token), timeout=5)
            calls.record(start, None)
        except grpc.RpcError as err:
            calls.record(start, f"gRPC {err.code().name}: {err.details()}")
        time.sleep(PAUSE_S)


def stream_client(stub: rpc.FraudServiceStub, token: str, features: list[float], stop: threading.Event,
                  calls: Calls) -> None:
    """One bidi stream open for the whole run: a message every PAUSE_S until `stop`, then half-close."""
    sent = 0

    def messages() -> Iterator[pb.PredictRequest]:
        nonlocal sent
        while not stop.is_set():
            sent += 1
            yield pb.PredictRequest(transaction=tx(features, f"s{sent}"))
            time.sleep(PAUSE_S)

    start = time.monotonic()
    try:
        answered = sum(1 for _ in stub.StreamPredict(messages(), metadata=bearer(token), timeout=30))
        calls.record(start, None if answered == sent else f"stream: {answered} answers to {sent} messages")
    except grpc.RpcError as err:
        calls.record(start, f"stream {err.code().name}: {err.details()}")


@dataclass
class StopUnderLoad:
    calls: Calls
    stop_at: float
    stopped_at: float
    drain: object


def stop_under_load(gw: GatewayProcess, signing_key: auth.SigningKey, features: list[float],
                    graceful: bool) -> StopUnderLoad:
    """Load for STEADY_S, `gw.stop(graceful)` from another thread, load for KEEP_SENDING_S more, then the clients
    stop (the stream half-closes) and close their connections; returns once the gateway has exited."""
    token = auth.mint_token(signing_key, "drain-load", tier="internal")
    calls, stop = Calls(), threading.Event()
    channel = grpc.insecure_channel(gw.target)
    stub = rpc.FraudServiceStub(channel)
    clients = [threading.Thread(target=rest_client, args=(gw, token, features, stop, calls)) for _ in range(3)]
    clients += [threading.Thread(target=grpc_client, args=(stub, token, features, stop, calls)) for _ in range(2)]
    clients.append(threading.Thread(target=stream_client, args=(stub, token, features, stop, calls)))
    for t in clients:
        t.start()
    result: dict[str, object] = {}
    try:
        time.sleep(STEADY_S)
        stop_at = time.monotonic()

        def stopper() -> None:
            result["drain"] = gw.stop(graceful=graceful)
            result["stopped_at"] = time.monotonic()

        stopping = threading.Thread(target=stopper)
        stopping.start()
        time.sleep(KEEP_SENDING_S)
    finally:
        stop.set()
        for t in clients:
            t.join(15)
        channel.close()
    stopping.join(DRAIN_TIME_S + 15)
    assert not stopping.is_alive(), "the gateway did not stop"
    return StopUnderLoad(calls, stop_at, float(result["stopped_at"]), result.get("drain"))


@pytest.fixture
def drain_gateway(fraud_service: ServiceProcess, signing_key: auth.SigningKey) -> Iterator[GatewayProcess]:
    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path, drain_time_s=DRAIN_TIME_S).start()
    yield gw
    gw.stop(graceful=False)


def test_drained_stop_under_load_fails_no_call(drain_gateway, signing_key, fraud_features):
    run = stop_under_load(drain_gateway, signing_key, fraud_features[0], graceful=True)
    assert run.calls.failed == []
    during_drain = [s for s in run.calls.ok if s >= run.stop_at]
    assert len(during_drain) >= 20, "the gateway kept answering while it drained"
    assert len(run.calls.ok) >= 100
    # SIGTERM came once the clients had gone (not at the end of the drain window), and nothing was left open.
    assert run.drain is not None and run.drain.connections_left == 0
    assert run.stopped_at - run.stop_at < DRAIN_TIME_S


def test_bare_sigterm_loses_calls(drain_gateway, signing_key, fraud_features):
    """The behaviour before the fix, kept as a check that the load above does catch lost calls: Envoy exits at
    once on SIGTERM, the open stream and the calls in flight are reset and later calls are refused."""
    run = stop_under_load(drain_gateway, signing_key, fraud_features[0], graceful=False)
    assert run.stopped_at - run.stop_at < 1.0
    assert any(error.startswith("stream") for _, error in run.calls.failed), run.calls.failed[:5]
    assert len(run.calls.failed) >= 20


def test_drain_command_is_the_prestop_hook(drain_gateway):
    """`python -m mlplatform_gateway drain` (the Kubernetes preStop hook) fails the gateway's health check and
    returns once no client is left; Envoy still runs, for the kubelet's SIGTERM."""
    import subprocess
    import sys

    from tests.gateway.helpers import http

    assert http("GET", f"http://{drain_gateway.target}/healthz").status == 200
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mlplatform_gateway", "drain", "--admin-port",
                           str(drain_gateway.admin_port), "--drain-time-s", str(DRAIN_TIME_S), "--min-wait-s", "0.5"],
                          capture_output=True, text=True, timeout=DRAIN_TIME_S + 10)
    assert done.returncode == 0, done.stderr
    assert 0.5 <= time.monotonic() - start < DRAIN_TIME_S
    assert "gateway drained in" in done.stderr
    assert drain_gateway.proc is not None and drain_gateway.proc.poll() is None
    assert http("GET", f"http://{drain_gateway.target}/healthz").status == 503
    ready = http("GET", f"http://127.0.0.1:{drain_gateway.admin_port}/ready")
    assert (ready.status, ready.body.strip()) == (503, b"DRAINING")


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_k8s_gateway_pod_drains_before_sigterm_within_its_grace_period():
    """The pod spec (k8s/base/platform/gateway/gateway.yaml, used unchanged by every overlay): Envoy's drain flags,
    a preStop hook that runs the drain above against the admin port of the k8s variant, with the same drain time,
    and a grace period above the preStop's longest run (so the kubelet's SIGTERM, not a SIGKILL, ends it)."""
    import yaml
    from mlplatform_gateway import local, render

    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "platform" / "gateway" / "gateway.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "gateway")
    drain_time = int(flag(c["args"], "--drain-time-s"))
    assert c["args"] == local.envoy_command(Path("/etc/envoy/config/envoy.yaml"), concurrency=2,
                                            drain_time_s=drain_time)[1:]
    assert flag(c["args"], "--drain-strategy") == "immediate"
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:4] == ["python", "-m", "mlplatform_gateway", "drain"]
    admin = render.load_values("k8s", {})["admin"]
    assert admin["address"] == "127.0.0.1" and int(flag(hook, "--admin-port")) == admin["port"]
    assert float(flag(hook, "--drain-time-s")) == drain_time
    min_wait = float(flag(hook, "--min-wait-s"))
    assert 0 < min_wait < drain_time
    assert pod["terminationGracePeriodSeconds"] > drain_time + min_wait
    # The readiness probe reads the path the health_check filter answers 503 once the drain has begun.
    config = yaml.safe_load(render.render("k8s"))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    health = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.health_check")["typed_config"]
    assert c["readinessProbe"]["httpGet"] == {"path": health["headers"][0]["string_match"]["exact"], "port": "http",
                                              "scheme": "HTTPS"}  # the k8s variant serves TLS
    # The image runs the hook with its own Python (the venv with mlplatform_gateway is on its PATH) and starts
    # Envoy with the same drain flags.
    dockerfile = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert "ENV PATH=/opt/venv/bin:" in dockerfile and "./gateway-envoy" in dockerfile
    cmd = next(line for line in dockerfile.replace("\\\n", "").splitlines() if line.startswith("CMD ["))
    args = json.loads(cmd.removeprefix("CMD "))
    assert args == local.envoy_command(Path("/etc/envoy/config/envoy.yaml"),
                                       drain_time_s=int(flag(args, "--drain-time-s")))[1:]
    # ... under the draining entrypoint (test_a_bare_sigterm_to_the_image_entrypoint_loses_no_call), on the admin
    # port the variants use.
    entry = next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT ["))
    assert json.loads(entry.removeprefix("ENTRYPOINT ")) == [
        "python", "-m", "mlplatform_gateway", "envoy", "--admin-port", str(admin["port"]), "--"]


def test_a_bare_sigterm_to_the_image_entrypoint_loses_no_call(fraud_service, signing_key, fraud_features):
    """The gateway image's entrypoint (`python -m mlplatform_gateway envoy -- ...`) drains Envoy when it gets the
    bare SIGTERM of `docker stop` / compose / podman (no preStop hook there), then stops it."""
    import subprocess
    import sys

    from mlplatform_gateway.local import envoy_command

    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path, drain_time_s=DRAIN_TIME_S)
    gw.config_path.write_text(gw.render())
    envoy_args = envoy_command(gw.config_path, log_flush_ms=200, drain_time_s=DRAIN_TIME_S)[1:]
    log = (gw.workdir / "envoy.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlplatform_gateway", "envoy", "--admin-port", str(gw.admin_port),
                             "--", *envoy_args], stdout=log, stderr=subprocess.STDOUT)
    gw.proc = proc
    try:
        gw.wait_healthy(1, cluster="fraud")
        run = stop_under_load(gw, signing_key, fraud_features[0], graceful=False)  # SIGTERM to the entrypoint
    finally:
        gw.stop(graceful=False)
    assert run.calls.failed == []
    assert len([s for s in run.calls.ok if s >= run.stop_at]) >= 20
    assert proc.returncode == 0
    assert "gateway drained in" in gw.logs()
