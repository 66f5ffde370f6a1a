"""Sentiment: runtimes compared in-process, and the served API's latency at concurrency 1 and 32.

1. Each runtime variant of the built version (TorchScript FP32, ONNX Runtime FP32, ONNX Runtime
   INT8) loaded through the service's own model class: held-out accuracy, and the median time of
   one `infer` call for a short (~20 tokens) and a long (~120 tokens) text at batch 1, and for
   32 texts of each length.
2. The served API (sentiment.v1 Predict over gRPC on loopback, cache off, one service per
   runtime in --served): closed-loop load at concurrency 1 and 32 with short and with long
   texts (all distinct); p50/p99, throughput, mean batch size and padding from the metrics.

Writes bench/results/<timestamp>-sentiment/report.md and results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mlplatform.launch import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.report import machine, percentiles  # noqa: E402

SUBJECTS = ["The hotel", "This blender", "The new update", "Our waiter", "The sequel", "The help desk",
            "The backpack", "This cafe"]
SHORT = "{s} number {i} was really lovely and I would happily recommend it to my friends."
LONG_SENTENCES = [
    "{s} number {i} arrived on time and the packaging was neat, which I appreciated after my last order.",
    "Setting it up took a few minutes, the instructions were clear and nothing was missing from the box.",
    "After two weeks of daily use it still works well, although the lid is a little stiff at times.",
    "Customer service answered my question about the warranty within an hour and were very polite.",
    "Compared with the cheaper model I had before, it is quieter, faster and feels much better made.",
    "I would buy it again without thinking twice and I have already recommended it to my sister.",
]


def texts(kind: str, n: int, offset: int = 0) -> list[str]:
    """Distinct texts of about 20 (short) or 120 (long) tokens; mixed: alternating."""
    out = []
    for i in range(offset, offset + n):
        s = SUBJECTS[i % len(SUBJECTS)]
        if kind == "short" or (kind == "mixed" and i % 2 == 0):
            out.append(SHORT.format(s=s, i=i))
        else:
            out.append(" ".join(x.format(s=s, i=i) for x in LONG_SENTENCES))
    return out


def held_out() -> tuple[list[str], list[str]]:
    from sentiment_service.build_model import DATA_FILE

    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    return [r["text"] for r in rows if r["split"] == "test"], [r["label"] for r in rows if r["split"] == "test"]


def compare_runtimes(repo: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy and median infer time per runtime variant, in this process."""
    from mlplatform.repository import ModelRepository
    from sentiment_service.model import SentimentModel

    version = ModelRepository(repo).resolve("sentiment")
    test_texts, labels = held_out()
    out: dict[str, dict[str, float]] = {}
    for variant in version.config.runtime.options["variants"]:
        model = SentimentModel(version, variant)
        asyncio.run(model.load())
        predicted = []
        for i in range(0, len(test_texts), 32):
            arr = np.array([t.encode() for t in test_texts[i:i + 32]], dtype=object)
            predicted += [model.labels[k] for k in model.infer({"text": arr})["label"]]
        row: dict[str, float] = {"accuracy": float(np.mean([p == y for p, y in zip(predicted, labels, strict=True)]))}
        for kind in ("short", "long"):
            for batch in (1, 32):
                arr = np.array([t.encode() for t in texts(kind, batch)], dtype=object)
                model.infer({"text": arr})
                times = []
                for _ in range(repeats if batch == 32 else repeats * 4):
                    t0 = time.perf_counter()
                    out_ = model.infer({"text": arr})
                    times.append(time.perf_counter() - t0)
                row[f"{kind}_b{batch}_ms"] = statistics.median(times) * 1000
                row[f"{kind}_tokens"] = float(out_["tokens"].mean())
        out[variant] = row
        print(f"runtime {variant}: {row}", flush=True)
        asyncio.run(model.unload())
    return out


METRIC = re.compile(r"^(inference_batch_size_(?:count|sum)|inference_batch_sequence_positions_total)"
                    r"\{([^}]*)\} (\S+)$")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m and 'model="sentiment"' in m.group(2):
            kind = re.search(r'kind="(\w+)"', m.group(2))
            out[m.group(1) + (f":{kind.group(1)}" if kind else "")] = float(m.group(3))
    return out


def padding(d: dict[str, float], rows: int) -> dict[str, float]:
    """Share of computed positions that were padding: served (length groups), one FIFO batch, fixed 128."""
    real = d.get("inference_batch_sequence_positions_total:real", 0.0)
    padded = d.get("inference_batch_sequence_positions_total:padded", 0.0)
    unsplit = d.get("inference_batch_sequence_positions_total:unsplit", 0.0)
    return {"padding_waste": 1 - real / padded if padded else 0.0,
            "fifo_padding_waste": 1 - real / unsplit if unsplit else 0.0,
            "fixed128_padding_waste": 1 - real / (rows * 128)}


async def closed_loop(target: str, requests: list, concurrency: int) -> tuple[float, list[float]]:
    import grpc
    from sentiment.v1 import sentiment_pb2_grpc as rpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.SentimentServiceStub(channel)
        todo = iter(requests)

        async def worker() -> None:
            for req in todo:
                t0 = time.perf_counter()
                await stub.Predict(req, timeout=60)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(requests) / (time.perf_counter() - t0), latencies


def served(repo: Path, runtime: str, calls: dict[int, int]) -> dict[str, dict[str, float]]:
    """p50/p99 of Predict at concurrency 1 and 32, short and long texts, against one service."""
    from sentiment.v1 import sentiment_pb2 as pb

    svc = ServiceProcess("sentiment_service", "SENTIMENT_", env={
        "SENTIMENT_MODEL_REPOSITORY": str(repo), "SENTIMENT_LOG_LEVEL": "WARNING",
        "SENTIMENT_CACHE_ENABLED": "false", "SENTIMENT_RUNTIME": runtime}).start(timeout=180)
    out: dict[str, dict[str, float]] = {}
    offset = 10_000
    try:
        warm = [pb.PredictRequest(text=t) for t in texts("short", 32, offset=90_000)]
        asyncio.run(closed_loop(svc.target, warm, 8))
        cases = [(k, c, n) for k in ("short", "long") for c, n in calls.items()] + [("mixed", 32, calls[32])]
        for kind, concurrency, n in cases:
            reqs = [pb.PredictRequest(text=t) for t in texts(kind, n, offset)]
            offset += n
            before = scrape(svc.metrics_port)
            rps, lat = asyncio.run(closed_loop(svc.target, reqs, concurrency))
            after = scrape(svc.metrics_port)
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            stats = percentiles(lat)
            key = f"{kind}_c{concurrency}"
            out[key] = {
                "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "rps": rps, "calls": n,
                "mean_batch": d["inference_batch_size_sum"] / max(d["inference_batch_size_count"], 1),
                **padding(d, n),
            }
            print(f"served {runtime} {key}: {out[key]}", flush=True)
    finally:
        svc.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--repeats", type=int, default=10, help="timed infer calls per case (x4 at batch 1)")
    parser.add_argument("--calls-c1", type=int, default=100)
    parser.add_argument("--calls-c32", type=int, default=640)
    parser.add_argument("--served", default="torchscript,onnx_int8", help="runtimes to serve, comma-separated")
    args = parser.parse_args()

    results: dict[str, object] = {"machine": machine()}
    results["runtimes"] = compare_runtimes(args.model_repository, args.repeats)
    calls = {1: args.calls_c1, 32: args.calls_c32}
    results["served"] = {rt: served(args.model_repository, rt, calls) for rt in args.served.split(",") if rt}

    out = ROOT / "bench" / "results" / (datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-sentiment")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    lines = [
        "# Sentiment benchmark", "",
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}; python {m['python']}. "
        f"Command: `python bench/legacy/sentiment_latency.py` (`make bench-models`).", "",
        "## Runtimes in-process (held-out accuracy; median ms per infer call, tokenisation included)", "",
        "| runtime | accuracy | short b1 | long b1 | short b32 | long b32 |", "|---|---|---|---|---|---|",
    ]
    for name, r in results["runtimes"].items():  # type: ignore[union-attr]
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['short_b1_ms']:.1f} | {r['long_b1_ms']:.1f} | "
                     f"{r['short_b32_ms']:.1f} | {r['long_b32_ms']:.1f} |")
    lines += ["", "## Served Predict over gRPC (loopback, cache off, distinct texts)", "",
              "Padding waste: share of computed positions that were padding, with length groups (served), "
              "as one FIFO batch padded to its longest text, and with the tokenizer's fixed padding to 128.", "",
              "| runtime | texts | concurrency | p50 ms | p99 ms | req/s | mean batch | padding waste: served "
              "/ FIFO / fixed 128 |",
              "|---|---|---|---|---|---|---|---|"]
    for rt, cases in results["served"].items():  # type: ignore[union-attr]
        for key, r in cases.items():
            kind, conc = key.split("_c")
            lines.append(f"| {rt} | {kind} | {conc} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rps']:.1f} | "
                         f"{r['mean_batch']:.1f} | {r['padding_waste']:.1%} / {r['fifo_padding_waste']:.1%} / "
                         f"{r['fixed128_padding_waste']:.1%} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
