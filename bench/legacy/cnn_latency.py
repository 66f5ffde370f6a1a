"""CNN Predict latency and dynamic batching: concurrency 1 and 32, direct gRPC and through the gateway.

1. The ONNX model in-process (the providers the config selects) at batch 1, 8, 16 and 32: the floor.
2. Closed loop (C unary Predict calls in flight, grpc.aio client, held-out digits as 8-bit PNGs, so
   each call decodes an image) at C = 1 and 32, straight to the service and through the Envoy gateway
   (internal-tier token, so the rate limit never trips), modes alternating per round. The service
   runs with its model config (max_queue_delay_ms 20, max_batch_size 32) and the cache off.
   Batch sizes come from the service's `inference_batch_size` histogram, queue wait and compute
   time from its `inference_queue_wait_seconds` / `inference_compute_duration_seconds`.

Starts its own service and gateway on free ports. Writes bench/results/<timestamp>/cnn.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
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

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def raw_onnx(model_dir: Path, images: np.ndarray, repeats: int) -> dict[str, Any]:
    """In-process latency per batch size with the providers the model config selects."""
    from cnn_service.model import CnnModel
    from mlplatform.repository import ModelRepository

    model = CnnModel(ModelRepository(model_dir.parent.parent).resolve("cnn", int(model_dir.name)))
    model._load()
    out: dict[str, Any] = {"providers": model.providers}
    for batch in (1, 8, 16, 32):
        x = {"image": images[:batch, None].astype(np.float32)}
        for _ in range(5):
            model.infer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.infer(x)
            times.append(time.perf_counter() - t0)
        out[str(batch)] = percentiles(times)
    return out


def scrape(port: int) -> dict[str, float]:
    """The cnn model's histogram samples from /metrics: `name{le}` -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(inference_(?:batch_size|queue_wait_seconds|compute_duration_seconds)_\w+)\{(.*)\} (\S+)$',
                     line)
        if m and 'model="cnn"' in m.group(2):
            le = re.search(r'le="([^"]+)"', m.group(2))
            out[m.group(1) + (f"{{{le.group(1)}}}" if le else "")] = float(m.group(3))
    return out


def batch_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batches, mean size, size histogram (batches per size range), mean queue wait and compute."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = d("inference_batch_size_count")
    waits = d("inference_queue_wait_seconds_count")
    cumulative = {b: d(f"inference_batch_size_bucket{{{float(b)}}}") for b in BATCH_BUCKETS}
    histogram, previous, lower = {}, 0.0, 1
    for b in BATCH_BUCKETS:
        histogram[str(b) if b == lower else f"{lower}-{b}"] = int(cumulative[b] - previous)
        previous, lower = cumulative[b], b + 1
    return {
        "batches": int(batches),
        "mean_batch": d("inference_batch_size_sum") / batches if batches else 0.0,
        "batch_histogram": histogram,
        "over_32": int(batches - cumulative[32]),
        "mean_queue_wait_ms": 1000 * d("inference_queue_wait_seconds_sum") / waits if waits else 0.0,
        "mean_compute_ms": 1000 * d("inference_compute_duration_seconds_sum") / batches if batches else 0.0,
    }


async def closed_loop(target: str, requests: list[Any], n: int, concurrency: int,
                      metadata: tuple[tuple[str, str], ...] | None, labels: np.ndarray) -> tuple[float, list[float]]:
    """`n` Predict calls with `concurrency` in flight; returns (req/s, latencies). Checks every answer."""
    import grpc
    from cnn.v1 import cnn_pb2_grpc as rpc

    latencies: list[float] = []
    wrong = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.CnnServiceStub(channel)
        todo = iter(range(n))

        async def worker() -> None:
            nonlocal wrong
            for i in todo:
                j = i % len(requests)
                t0 = time.perf_counter()
                resp = await stub.Predict(requests[j], metadata=metadata, timeout=30)
                latencies.append(time.perf_counter() - t0)
                wrong += resp.classification.classes[0].class_index != labels[j]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rps = n / (time.perf_counter() - t0)
    if wrong > 0.05 * n:
        raise RuntimeError(f"{wrong} of {n} answers were wrong")
    return rps, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--calls", type=int, default=600, help="calls per mode and concurrency level per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; modes alternate within each")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--no-gateway", action="store_true", help="direct gRPC only")
    args = parser.parse_args()

    from cnn.v1 import cnn_pb2 as pb
    from mlplatform_gateway import auth

    from cnn_service.build_model import png_bytes

    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    model_dir = args.model_repository / "cnn" / "1"
    heldout = np.load(model_dir / "heldout.npz")
    images, labels = heldout["images"], heldout["labels"]
    requests = [pb.PredictRequest(image=png_bytes(px), top_k=1) for px in images]
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = ["grpc_direct"] if args.no_gateway else ["grpc_direct", "grpc_gateway"]
    results: dict[str, Any] = {"machine": machine(), "calls": args.calls, "rounds": args.rounds,
                               "input": "8-bit PNG 32x32 (held-out digits)", "cache": "off"}
    results["raw_onnx"] = raw_onnx(model_dir, images, repeats=200)
    print(f"raw model ({results['raw_onnx']['providers'][0]}): " + ", ".join(
        f"batch {b} p50 {results['raw_onnx'][str(b)]['p50_ms']:.3f} ms" for b in (1, 8, 16, 32)), flush=True)

    keys = Path(tempfile.mkdtemp(prefix="bench-cnn-keys-"))
    runs: dict[str, list[dict[str, Any]]] = {}
    with owned_processes(keys) as procs:
        key = auth.ensure_dev_keys(keys)
        metadata = (("authorization", f"Bearer {auth.mint_token(key, 'bench', tier='internal', ttl_s=3600)}"),)
        svc = procs["cnn service"] = ServiceProcess("cnn_service", "CNN_", env={
            "CNN_MODEL_REPOSITORY": str(args.model_repository), "CNN_LOG_LEVEL": "WARNING",
            "CNN_CACHE_ENABLED": "false"})
        svc.start()
        targets = {"grpc_direct": (svc.target, None)}
        if not args.no_gateway:
            gw = procs["gateway"] = GatewayProcess({"cnn": [svc.target]}, key.jwks_path)
            gw.start()
            targets["grpc_gateway"] = (gw.target, metadata)
        for mode in modes:  # warm connections, the loop and every batch size
            asyncio.run(closed_loop(targets[mode][0], requests, 200, 32, targets[mode][1], labels))
        for rnd in range(args.rounds):
            for c in levels:
                for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                    target, md = targets[mode]
                    before = scrape(svc.metrics_port)
                    rps, lat = asyncio.run(closed_loop(target, requests, args.calls, c, md, labels))
                    after = scrape(svc.metrics_port)
                    r = {"rps": rps, **percentiles(lat), **batch_summary(before, after)}
                    runs.setdefault(f"c{c}/{mode}", []).append(r)
                    print(f"[{rnd + 1}/{args.rounds}] concurrency {c:2d} {mode:12s}: {rps:6.0f} req/s, "
                          f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, mean batch {r['mean_batch']:.2f} "
                          f"{r['batch_histogram']}, queue wait {r['mean_queue_wait_ms']:.1f} ms, "
                          f"compute {r['mean_compute_ms']:.2f} ms/batch", flush=True)

    numeric = ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_batch", "mean_queue_wait_ms", "mean_compute_ms")
    median = {k: {m: float(np.median([r[m] for r in rs])) for m in numeric} for k, rs in runs.items()}
    for k, rs in runs.items():  # batch-size histogram summed over the rounds
        median[k]["batch_histogram"] = {b: sum(r["batch_histogram"][b] for r in rs) for b in rs[0]["batch_histogram"]}
        median[k]["over_32"] = sum(r["over_32"] for r in rs)
    results["runs"], results["median"] = runs, median
    out = ROOT / "bench" / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cnn.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    raw = results["raw_onnx"]
    lines = [
        "# CNN Predict latency and batching", "",
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}; providers {raw['providers']}; cache off; "
        f"PNG input; {args.calls} calls per cell per round, medians of {args.rounds} rounds.", "",
        "Raw model in-process: " + ", ".join(f"batch {b} p50 {raw[str(b)]['p50_ms']:.3f} ms" for b in (1, 8, 16, 32)),
        "", "| concurrency / mode | req/s | p50 ms | p99 ms | mean batch | batches by size (all rounds) | "
            "queue wait ms | compute ms/batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in median.items():
        hist = " ".join(f"{b}:{n}" for b, n in r["batch_histogram"].items() if n)
        lines.append(f"| {k} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch']:.2f} | "
                     f"{hist} | {r['mean_queue_wait_ms']:.1f} | {r['mean_compute_ms']:.2f} |")
    (out / "cnn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {out / 'cnn.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
