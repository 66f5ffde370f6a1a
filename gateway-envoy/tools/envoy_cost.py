"""Envoy's CPU per call: the real gateway (local variant) in front of an upstream, open-loop load at a steady
rate, Envoy's process CPU (utime + stime from /proc/<pid>/stat) over the load window divided by the calls.

    .venv/bin/python gateway-envoy/tools/envoy_cost.py --kind rest --rate 500 --duration 15
    .venv/bin/python gateway-envoy/tools/envoy_cost.py --kind grpc --set access_log.format=none
    .venv/bin/python gateway-envoy/tools/envoy_cost.py --upstream fraud --rate 150 --keys 80

The upstream is by default a stub fraud service (`--upstream stub`: a grpc.aio server in its own process
answering `fraud.v1.FraudService/Predict` with a fixed answer, plus grpc.health.v1), so Envoy's share is
not blurred by model CPU on this 2-core machine; `--upstream fraud` starts the real service (cache off).
`--set dotted.key=yaml` overrides the gateway's render values (A/B of a config change, one at a time),
`--concurrency N` Envoy's worker threads. Requests are spread over `--keys` distinct standard-tier API keys
(default: enough to stay under 100 req/min per key), so the rate limiter and the JWT cache do their usual
work. Prints one JSON line: calls, ok, Envoy CPU ms per call (raw, and less Envoy's idle CPU measured just
before), latency percentiles. Loopback only; every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(user_system(pid))


def user_system(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class CpuTrace:
    """(wall time, CPU seconds) of a process every `interval_s`, in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), cpu_seconds(self.pid)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> CpuTrace:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """CPU seconds at wall time `t` (linear between the nearest samples)."""
        before = [s for s in self.samples if s[0] <= t]
        after = [s for s in self.samples if s[0] >= t]
        if not before or not after:
            raise ValueError("no CPU samples around the load window")
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)


# ---------------------------------------------------------------- the stub upstream (its own process)

async def serve_stub(port: int) -> None:
    import grpc
    from fraud.v1 import fraud_pb2
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    answer = fraud_pb2.PredictResponse(prediction=fraud_pb2.FraudPrediction(
        transaction_id="tx", fraud_probability=0.01, threshold=0.5, model_name="fraud", model_version="1"))

    async def predict(request: fraud_pb2.PredictRequest, context: object) -> fraud_pb2.PredictResponse:
        return answer

    handler = grpc.method_handlers_generic_handler("fraud.v1.FraudService", {
        "Predict": grpc.unary_unary_rpc_method_handler(
            predict, request_deserializer=fraud_pb2.PredictRequest.FromString,
            response_serializer=fraud_pb2.PredictResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    checker = health.aio.HealthServicer()
    await checker.set("fraud.v1.FraudService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# ---------------------------------------------------------------- the measurement

CANDIDATE_FILTERS = {
    # Envoy's own shedding filters, as candidates in front of the router (measurement only, see the README).
    "adaptive_concurrency": {
        "name": "envoy.filters.http.adaptive_concurrency",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency",
            "gradient_controller_config": {
                "sample_aggregate_percentile": {"value": 90},
                "concurrency_limit_params": {"concurrency_update_interval": "0.1s"},
                "min_rtt_calc_params": {"interval": "60s", "request_count": 50}}}},
    "admission_control": {
        "name": "envoy.filters.http.admission_control",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.admission_control.v3.AdmissionControl",
            "enabled": {"default_value": True, "runtime_key": "admission_control.enabled"},
            "success_criteria": {"http_criteria": {"http_success_status": [{"start": 100, "end": 500}]},
                                 "grpc_criteria": {"grpc_success_status": [0, 1, 3, 5, 6, 7, 9, 11, 16]}},
            "sampling_window": "10s",
            "sr_threshold": {"default_value": {"value": 95.0}, "runtime_key": "admission_control.sr_threshold"}}},
}


def ablate(text: str, drops: list[str], adds: list[str] = ()) -> str:
    """The rendered config without the named parts (ablation, to see what each costs; never for serving):
    an HTTP filter by the end of its name (`jwt_authn`, `local_ratelimit`, ...), `access_log`,
    `health_checks` (the upstream clusters' active health checks); `adds` inserts candidate filters."""
    if not drops and not adds:
        return text
    config = yaml.safe_load(text)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                if "access_log" in drops:
                    hcm.pop("access_log", None)
                hcm["http_filters"] = [h for h in hcm.get("http_filters", [])
                                       if not any(h["name"].endswith("." + d) for d in drops)]
                if listener["name"] == "gateway":
                    hcm["http_filters"][-1:-1] = [CANDIDATE_FILTERS[a] for a in adds]
    if "health_checks" in drops:
        for cluster in config["static_resources"]["clusters"]:
            cluster.pop("health_checks", None)
    return yaml.safe_dump(config)


def variant_parser() -> argparse.ArgumentParser:
    """The options of one gateway variant (`--variant "label: options"`)."""
    vp = argparse.ArgumentParser(prog="variant", add_help=False)
    vp.add_argument("--concurrency", type=int, default=None, help="Envoy --concurrency (default: the gateway's)")
    vp.add_argument("--set", action="append", default=[], metavar="KEY=YAML", help="gateway render override")
    vp.add_argument("--drop", action="append", default=[], help="ablation: a filter / access_log / health_checks")
    vp.add_argument("--add", action="append", default=[], choices=sorted(CANDIDATE_FILTERS),
                    help="a candidate filter, inserted before the router")
    return vp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[variant_parser()])
    ap.add_argument("--kind", choices=("rest", "grpc"), default="rest")
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second to each gateway variant")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load (keep it short: 2 shared cores)")
    ap.add_argument("--keys", type=int, default=0, help="distinct API keys (0: enough for 100 req/min each)")
    ap.add_argument("--upstream", choices=("stub", "fraud"), default="stub")
    ap.add_argument("--variant", action="append", default=[], metavar="'LABEL: OPTIONS'",
                    help="a gateway variant (options: --set/--drop/--concurrency); several run side by side under "
                         "the same load, each getting --rate (a paired A/B: the machine's noise hits them alike)")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured before the load")
    ap.add_argument("--stats", default="", help="print the admin stats matching this regex after the run")
    args = ap.parse_args()
    variants = []
    for spec in args.variant:
        label, _, opts = spec.partition(":")
        variants.append((label.strip(), variant_parser().parse_args(opts.split())))
    if not variants:
        variants.append((" ".join(args.set + [f"-{d}" for d in args.drop] + [f"+{a}" for a in args.add])
                         or "baseline", args))

    from mlplatform_gateway import auth
    from mlplatform_gateway.__main__ import parse_set
    from mlplatform_gateway.local import GatewayProcess

    from bench import loadgen
    from bench.stack import keys_for
    from mlplatform.launch import free_port

    keys_dir = Path(tempfile.mkdtemp(prefix="envoy-cost-keys-"))
    key = auth.ensure_dev_keys(keys_dir)
    n_keys = args.keys or keys_for(args.rate, args.duration)
    tokens = tuple(auth.mint_token(key, f"cost-{i}", ttl_s=3600) for i in range(n_keys))
    procs: list = []
    gateways: list = []
    try:
        if args.upstream == "stub":
            port = free_port()
            stub = subprocess.Popen([sys.executable, __file__, "--serve-stub", str(port)], cwd=ROOT)
            procs.append(stub)
            target = f"127.0.0.1:{port}"
        else:
            from bench.stack import service

            svc = service("fraud", ROOT / "model_repository", cache=False)
            procs.append(svc)
            target = svc.target
        for _, v in variants:
            gw = GatewayProcess({"fraud": [target]}, key.jwks_path, parse_set(v.set), concurrency=v.concurrency)
            gateways.append(gw)
            rendered = gw.render
            gw.render = lambda rendered=rendered, v=v: ablate(rendered(), v.drop, v.add)  # type: ignore[method-assign]
            gw.start(timeout=60)
        targets = [loadgen.Target("fraud", args.kind, gw.target, tokens=tokens) for gw in gateways]
        pids = [gw.proc.pid for gw in gateways]
        traces = [CpuTrace(pid) for pid in pids]
        for t in traces:
            t.__enter__()
        try:
            time.sleep(args.idle)
            us0 = [user_system(pid) for pid in pids]
            idle_end = time.time()
            total_rate = args.rate * len(targets)
            result = loadgen.run(targets, [loadgen.Phase(args.duration, total_rate)],
                                 processes=loadgen.worker_processes(total_rate), timeout_s=5.0)
            t0, t1 = result.start_wall, result.start_wall + args.duration
            time.sleep(0.3)
            us1 = [user_system(pid) for pid in pids]
        finally:
            for t in traces:
                t.__exit__()
        for k, ((label, v), gw, trace) in enumerate(zip(variants, gateways, traces, strict=True)):
            idle_cps = (trace.at(idle_end) - trace.samples[0][1]) / (idle_end - trace.samples[0][0])
            cpu = trace.at(t1) - trace.at(t0)
            sel = result.target == k
            calls = int(sel.sum())
            ok = int((sel & (result.status == "ok")).sum())
            lat = result.latency[sel & (result.status == "ok")] * 1000
            errors: dict[str, int] = {}
            for st in result.status[sel & (result.status != "ok")]:
                errors[str(st)] = errors.get(str(st), 0) + 1
            print(json.dumps({
                "label": label, "kind": args.kind, "rate": args.rate, "duration_s": args.duration,
                "keys": n_keys, "upstream": args.upstream, "concurrency": v.concurrency, "set": v.set,
                "drop": v.drop, "add": v.add, "calls": calls, "ok": ok, "errors": errors,
                "envoy_cpu_ms_per_call": round(cpu / calls * 1000, 4),
                "envoy_cpu_ms_per_call_less_idle": round((cpu - idle_cps * (t1 - t0)) / calls * 1000, 4),
                "envoy_idle_cpu_pct": round(idle_cps * 100, 2),
                "user_share": round((us1[k][0] - us0[k][0]) / max(1e-9, sum(us1[k]) - sum(us0[k])), 2),
                "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}), flush=True)
            if args.stats:
                print(gw.admin(f"/stats?filter={args.stats}"), flush=True)
    finally:
        for gw in gateways:
            gw.stop()
            shutil.rmtree(gw.workdir, ignore_errors=True)
        for p in procs:
            if isinstance(p, subprocess.Popen):
                p.terminate()
                p.wait(10)
            else:
                p.stop()
        shutil.rmtree(keys_dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-stub":
        asyncio.run(serve_stub(int(sys.argv[2])))
    else:
        main()
