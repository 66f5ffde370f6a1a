"""Latency of sequential fraud Predict calls over gRPC on loopback, beside the raw model.

Starts its own fraud service (and Redis when installed) on free ports, sends N
sequential unary Predict calls with distinct rows (cache misses), then the same
rows again (cache hits), and times the ONNX model in-process at batch 1 as the
floor. Writes bench/results/<timestamp>/report.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import RedisServer, ServiceProcess  # noqa: E402


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    import grpc
    import onnxruntime as ort
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as rpc

    from fraud_service.build_model import generate_dataset

    x, _ = generate_dataset(args.calls + args.warmup + 10, seed=99)
    x = x.astype(np.float32)
    results: dict[str, object] = {"calls": args.calls, "machine": {
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version()}}

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

    out = ROOT / "bench" / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Sequential fraud Predict latency", "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['cpu_model']}; "
        f"cache backend: {results['cache_backend']}; {args.calls} sequential calls each, one client, loopback.", "",
        "| path | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---|---|---|---|",
    ]
    for key in ("raw_onnx_batch1", "grpc_predict_cache_miss", "grpc_predict_cache_hit"):
        r = results[key]
        lines.append(f"| {key} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
