"""Fraud Predict latency over gRPC on loopback, beside the raw model.

1. The ONNX model in-process at batch 1: the floor.
2. N sequential unary Predict calls with distinct rows (cache misses), then the same
   rows again (cache hits), against a fraud service using Redis (when installed).
3. Closed-loop concurrency (C calls in flight, grpc.aio client) with the cache off,
   once per queue delay in --delays, side by side in one run: throughput, p50/p99 and
   the mean batch size read from the service's metrics.

Starts its own services on free ports. Writes bench/results/<timestamp>/report.md and
results.json. Loopback only, bounded by --calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mlplatform.launch import RedisServer, ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.report import machine, percentiles  # noqa: E402


def concurrent_run(args: argparse.Namespace, x: np.ndarray, delay_ms: float, concurrency: int, calls: int
                   ) -> dict[str, float]:
    """Closed-loop load at `concurrency` against a service whose queue delay is `delay_ms`."""
    import asyncio
    import shutil
    import tempfile

    import grpc
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as rpc

    repo = Path(tempfile.mkdtemp(prefix="bench-repo-"))
    shutil.copytree(args.model_repository / "fraud" / "1", repo / "fraud" / "1")
    config_path = repo / "fraud" / "1" / "config.json"
    config = json.loads(config_path.read_text())
    config["batching"]["max_queue_delay_ms"] = delay_ms
    config_path.write_text(json.dumps(config))
    requests = [pb.PredictRequest(transaction=pb.Transaction(features=r.tolist())) for r in x[: args.concurrent_calls]]

    async def load(target: str, n: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(target) as channel:
            stub = rpc.FraudServiceStub(channel)
            todo = iter(range(n))

            async def worker() -> None:
                for i in todo:
                    t0 = time.perf_counter()
                    await stub.Predict(requests[i % len(requests)], timeout=10)
                    latencies.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return n / (time.perf_counter() - t0), latencies

    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(repo), "FRAUD_LOG_LEVEL": "WARNING", "FRAUD_CACHE_ENABLED": "false"}).start()
    try:
        asyncio.run(load(svc.target, min(200, calls)))  # warm the connection and the loop
        before = _batch_stats(svc.metrics_port)
        rps, latencies = asyncio.run(load(svc.target, calls))
        after = _batch_stats(svc.metrics_port)
    finally:
        svc.stop()
        shutil.rmtree(repo, ignore_errors=True)
    stats = percentiles(latencies)
    batches = after[0] - before[0]
    return {"rps": rps, "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
            "mean_batch": (after[1] - before[1]) / batches if batches else 0.0}


def _batch_stats(port: int) -> tuple[float, float]:
    """(batches, rows) so far, from the service's inference_batch_size histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("inference_batch_size_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("inference_batch_size_sum"):
            total = float(line.rsplit(" ", 1)[1])
    return count, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--concurrent-calls", type=int, default=4000)
    parser.add_argument("--delays", default="0,2", help="max_queue_delay_ms values to compare, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per delay; medians are reported")
    args = parser.parse_args()

    import grpc
    import onnxruntime as ort
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as rpc

    from fraud_service.build_model import generate_dataset

    x, _ = generate_dataset(max(args.calls + args.warmup, args.concurrent_calls) + 10, seed=99)
    x = x.astype(np.float32)
    results: dict[str, object] = {"calls": args.calls, "machine": {
        **machine()}}

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(args.model_repository / "fraud" / "1" / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])
    raw = []
    for row in x[: args.calls]:
        t0 = time.perf_counter()
        sess.run(None, {"features": row[None]})
        raw.append(time.perf_counter() - t0)
    results["raw_onnx_batch1"] = percentiles(raw)
    print(f"raw ONNX batch 1: {results['raw_onnx_batch1']}", flush=True)

    redis = None
    env = {"FRAUD_MODEL_REPOSITORY": str(args.model_repository), "FRAUD_LOG_LEVEL": "WARNING"}
    try:
        redis = RedisServer().start()
        env["REDIS_URL"] = redis.url
    except RuntimeError:
        print("redis-server not installed: the service uses its in-process cache", flush=True)
    results["cache_backend"] = "redis" if redis else "memory"
    svc = ServiceProcess("fraud_service", "FRAUD_", env=env).start()
    try:
        with grpc.insecure_channel(svc.target) as channel:
            stub = rpc.FraudServiceStub(channel)

            def call(row: np.ndarray) -> tuple[float, bool]:
                req = pb.PredictRequest(transaction=pb.Transaction(features=row.tolist()))
                t0 = time.perf_counter()
                resp = stub.Predict(req, timeout=5)
                return time.perf_counter() - t0, resp.prediction.cached

            for row in x[-args.warmup:]:
                call(row)
            misses = [call(row) for row in x[: args.calls]]
            hits = [call(row) for row in x[: args.calls]]
        assert not any(c for _, c in misses) and all(c for _, c in hits)
        results["grpc_predict_cache_miss"] = percentiles([t for t, _ in misses])
        results["grpc_predict_cache_hit"] = percentiles([t for t, _ in hits])
    finally:
        svc.stop()
        if redis:
            redis.stop()
    for key in ("grpc_predict_cache_miss", "grpc_predict_cache_hit"):
        print(f"{key}: {results[key]}", flush=True)

    runs: dict[str, list[dict[str, float]]] = {}
    delays = [float(d) for d in args.delays.split(",")]
    for rep in range(args.repeats):
        for concurrency, calls in ((1, args.calls), (args.concurrency, args.concurrent_calls)):
            for delay in delays:  # alternate, so drift on a shared machine hits every setting alike
                r = concurrent_run(args, x, delay, concurrency, calls)
                runs.setdefault(f"c{concurrency}/d{delay:g}", []).append(r)
                print(f"[{rep + 1}/{args.repeats}] concurrency {concurrency}, max_queue_delay_ms={delay:g}: "
                      f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                      f"mean batch {r['mean_batch']:.2f}", flush=True)
    concurrent = {d: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for d, rs in runs.items()}
    results["closed_loop"] = {"repeats": args.repeats, "median": concurrent, "runs": runs}

    out = ROOT / "bench" / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Fraud Predict latency", "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['cpu_model']}; "
        f"cache backend: {results['cache_backend']}; {args.calls} sequential calls each, one client, loopback.", "",
        "| path | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---|---|---|---|",
    ]
    for key in ("raw_onnx_batch1", "grpc_predict_cache_miss", "grpc_predict_cache_hit"):
        r = results[key]
        lines.append(f"| {key} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} |")
    lines += [
        "", "## Closed loop by queue delay, cache off", "",
        f"Concurrency 1 ({args.calls} calls) and {args.concurrency} ({args.concurrent_calls} calls); "
        f"medians of {args.repeats} alternating runs per setting.", "",
        "| concurrency / max_queue_delay_ms | req/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|",
    ]
    for key, r in concurrent.items():
        lines.append(f"| {key} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch']:.2f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
