"""Gateway overhead: the same fraud Predict calls direct and through the Envoy gateway.

Starts a fraud service (cache off, so every call runs the model) and the real Envoy gateway
(local variant, as `make run` renders it) on free loopback ports, then measures side by side,
for the same requests, at each concurrency in --concurrency:

  grpc_direct    gRPC straight to the service
  grpc_gateway   gRPC through Envoy (JWT check, rate limit, access log, HTTP/2 proxy)
  rest_gateway   REST/JSON through Envoy (the same plus gRPC-JSON transcoding)

Closed loop: C threads sharing one gRPC channel per target; for REST each thread has its own
keep-alive HTTP/1.1 connection. Every mode is warmed up first
(not measured); then --calls requests per mode are spread over --rounds rounds, the modes'
order rotating each round so that drift on a shared machine hits every mode alike. The
token has tier "internal", so the per-key rate limit (100/min for standard tokens) does not
interfere. Also reports CPU time per request of each process (client, service, Envoy).

Writes bench/results/<timestamp>/gateway.md and gateway.json. Loopback only, bounded by
--calls; every process it started is stopped on the way out, failures and SIGTERM included.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from mlplatform_gateway.local import GatewayProcess

from mlplatform.launch import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.report import machine, percentiles  # noqa: E402
from bench.stack import owned_processes  # noqa: E402

MODES = ("grpc_direct", "grpc_gateway", "rest_gateway")
REST_PATH = "/api/v1/fraud"


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process's live threads have run so far (/proc/<pid>/task/*/schedstat, ns-exact)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError, IndexError, ValueError):  # a thread that just exited
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass
class Workload:
    """The requests every mode sends, pre-encoded both ways, and the probability each should get."""

    protos: list[Any]
    bodies: list[bytes]
    expected: list[float]

    @classmethod
    def from_samples(cls, sample_path: Path, n: int) -> Workload:
        from fraud.v1 import fraud_pb2 as pb

        rows = json.loads(sample_path.read_text())["rows"]
        protos, bodies, expected = [], [], []
        for i in range(n):
            row = rows[i % len(rows)]
            tx = {"transaction_id": f"bench-{i}", "features": row["features"]}
            protos.append(pb.PredictRequest(transaction=pb.Transaction(**tx)))
            bodies.append(json.dumps({"transaction": tx}).encode())
            expected.append(float(row["expected_probability"]))
        return cls(protos, bodies, expected)


@dataclass
class Clients:
    """Connections for one concurrency level: a gRPC channel per target, an HTTP connection per worker."""

    service_target: str
    gateway_target: str
    token: str
    concurrency: int
    stack: ExitStack = field(default_factory=ExitStack)

    def __post_init__(self) -> None:
        import grpc
        from fraud.v1 import fraud_pb2_grpc as rpc

        direct = self.stack.enter_context(grpc.insecure_channel(self.service_target))
        gateway = self.stack.enter_context(grpc.insecure_channel(self.gateway_target))
        self.direct = rpc.FraudServiceStub(direct)
        self.gateway = rpc.FraudServiceStub(gateway)
        self.metadata = (("authorization", f"Bearer {self.token}"),)
        host, port = self.gateway_target.rsplit(":", 1)
        self.http = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(self.concurrency)]
        for conn in self.http:
            self.stack.callback(conn.close)
        self.headers = {"authorization": f"Bearer {self.token}", "content-type": "application/json"}

    def caller(self, mode: str, work: Workload) -> Callable[[int, int], float]:
        """call(worker, i) -> the fraud probability of request i; raises on any error."""
        if mode == "grpc_direct":
            return lambda _w, i: self.direct.Predict(work.protos[i], timeout=10).prediction.fraud_probability
        if mode == "grpc_gateway":
            return lambda _w, i: self.gateway.Predict(work.protos[i], timeout=10,
                                                      metadata=self.metadata).prediction.fraud_probability

        def rest(worker: int, i: int) -> float:
            conn = self.http[worker]
            conn.request("POST", REST_PATH, body=work.bodies[i], headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"REST call {i}: HTTP {resp.status}: {body[:300]!r}")
            return json.loads(body)["prediction"]["fraud_probability"]

        return rest

    def close(self) -> None:
        self.stack.close()


def closed_loop(call: Callable[[int, int], float], work: Workload, start: int, n: int, concurrency: int
                ) -> tuple[list[float], float]:
    """Requests start..start+n-1 from `concurrency` threads; (latencies in s, wall time in s)."""
    todo = iter(range(start, start + n))  # next() on a range iterator is atomic under the GIL
    latencies: list[float] = []
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in todo:
                if errors:  # another worker failed: stop early
                    return
                t0 = time.perf_counter()
                p = call(w, i % len(work.expected))
                latencies.append(time.perf_counter() - t0)
                expected = work.expected[i % len(work.expected)]
                if abs(p - expected) > 1e-4:
                    raise AssertionError(f"request {i}: probability {p}, expected {expected}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return latencies, wall


def summarize(latencies: list[float], wall_s: float, cpu_s: dict[str, float]) -> dict[str, float]:
    n = len(latencies)
    out = {**percentiles(latencies), "rps": n / wall_s}
    out.update({f"cpu_us_per_req_{name}": s / n * 1e6 for name, s in cpu_s.items()})
    return out


def bench_concurrency(args: argparse.Namespace, work: Workload, clients: Clients, pids: dict[str, int]
                      ) -> dict[str, dict[str, Any]]:
    """Warm up every mode, then --rounds rotating rounds of each; pooled stats per mode."""
    c = clients.concurrency
    calls = {mode: clients.caller(mode, work) for mode in MODES}
    for mode in MODES:
        closed_loop(calls[mode], work, 0, args.warmup, c)
    per_round = max(1, args.calls // args.rounds)
    pooled: dict[str, dict[str, Any]] = {m: {"lat": [], "wall": 0.0, "cpu": {}, "rounds": []} for m in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
            before = {"client": time.process_time(), **{k: process_cpu_s(p) for k, p in pids.items()}}
            lat, wall = closed_loop(calls[mode], work, r * per_round, per_round, c)
            after = {"client": time.process_time(), **{k: process_cpu_s(p) for k, p in pids.items()}}
            acc = pooled[mode]
            acc["lat"] += lat
            acc["wall"] += wall
            for k in before:
                acc["cpu"][k] = acc["cpu"].get(k, 0.0) + after[k] - before[k]
            acc["rounds"].append({"rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50) * 1000)})
    results = {}
    for mode, acc in pooled.items():
        results[mode] = {**summarize(acc["lat"], acc["wall"], acc["cpu"]), "rounds": acc["rounds"]}
        r = results[mode]
        print(f"concurrency {c:>2} {mode:<13} p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
              f"mean {r['mean_ms']:.2f} ms  {r['rps']:.0f} req/s", flush=True)
    return results


def write_report(out: Path, results: dict[str, Any], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    lines = [
        "# Gateway overhead: fraud Predict direct vs through Envoy", "",
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}; Python {m['python']}; {m['envoy']}. "
        f"Cache off; {results['calls']} calls per mode per concurrency after {args.warmup} warm-up calls, "
        f"in {args.rounds} rounds with the modes' order rotating; client, service and Envoy on the same "
        "machine, loopback.", "",
        "| concurrency | mode | p50 ms | p90 ms | p99 ms | mean ms | req/s | Δp50 vs direct ms |"
        " CPU µs/req client | service | envoy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, by_mode in results["runs"].items():
        base = by_mode["grpc_direct"]["p50_ms"]
        for mode, r in by_mode.items():
            lines.append(
                f"| {c} | {mode} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} "
                f"| {r['rps']:.0f} | {r['p50_ms'] - base:+.2f} | {r['cpu_us_per_req_client']:.0f} "
                f"| {r['cpu_us_per_req_service']:.0f} | {r['cpu_us_per_req_envoy']:.0f} |")
    (out / "gateway.md").write_text("\n".join(lines) + "\n")


def envoy_version(binary: str) -> str:
    """`Envoy 1.40.0` from `envoy --version` (`... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`)."""
    import subprocess

    try:
        text = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        return f"Envoy {text.split('version:', 1)[1].split('/')[1]}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "Envoy (version unknown)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per mode per concurrency")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls per mode per concurrency")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")
    parser.add_argument("--rounds", type=int, default=10, help="rounds the calls are split into, modes rotating")
    parser.add_argument("--out", type=Path, help="report directory (default bench/results/<timestamp>)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.calls < args.rounds or args.rounds < 1 or args.warmup < 1 or min(levels) < 1:
        parser.error("need --rounds >= 1, --calls >= --rounds, --warmup >= 1 and every concurrency >= 1")

    from mlplatform_gateway import auth
    from mlplatform_gateway.render import envoy_binary

    # SIGTERM (e.g. from a CI timeout) unwinds through the finally blocks below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The local config traces when this is set at render time; measure the untraced path.
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    work = Workload.from_samples(args.model_repository / "fraud" / "1" / "sample.json", max(args.calls, args.warmup))
    results: dict[str, Any] = {
        "calls": args.rounds * (args.calls // args.rounds), "warmup": args.warmup, "rounds": args.rounds,
        "cache": "off",
        "machine": {**machine(),
                    "envoy": envoy_version(envoy_binary())},
        "runs": {},
    }
    keys = Path(tempfile.mkdtemp(prefix="bench-gateway-keys-"))
    with owned_processes(keys) as procs:
        key = auth.ensure_dev_keys(keys)
        token = auth.mint_token(key, "bench", tier="internal", ttl_s=3600)
        svc = procs["fraud service"] = ServiceProcess("fraud_service", "FRAUD_", env={
            "FRAUD_MODEL_REPOSITORY": str(args.model_repository), "FRAUD_LOG_LEVEL": "WARNING",
            "FRAUD_CACHE_ENABLED": "false"})
        svc.start()
        gw = procs["gateway"] = GatewayProcess({"fraud": [svc.target]}, key.jwks_path)
        gw.start()
        assert svc.proc is not None and gw.proc is not None
        pids = {"service": svc.proc.pid, "envoy": gw.proc.pid}
        print(f"fraud service on {svc.target}, Envoy gateway on {gw.target}", flush=True)
        for c in levels:
            clients = Clients(svc.target, gw.target, token, c)
            try:
                results["runs"][str(c)] = bench_concurrency(args, work, clients, pids)
            finally:
                clients.close()

    out = args.out or ROOT / "bench" / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    write_report(out, results, args)
    print(f"report: {out / 'gateway.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
