"""Which execution providers the cnn model gets on this machine, and its latency per batch size.

    python bench/legacy/gpu_check.py [--model-repository model_repository] [--providers A,B,...] [--repeats 200]

Loads the served cnn version exactly as the service does (`CnnModel`: the config's provider preference,
TensorRT FP16 options with the engine cache under the version directory and the optimisation profile
for batch 1/16/32), then prints: onnxruntime's version and available providers, the providers asked for
(with their resolved options) and the ones the session actually got; per batch size 1, 8, 16, 32 the
first call (TensorRT builds or loads its engine then) and p50/p99 of the following ones; and how far the
outputs are from ONNX Runtime's CPU FP32 on the held-out digits (max abs diff of probabilities, argmax
agreement, held-out accuracy). On a CPU-only onnxruntime it runs on CPU and says so. Writes nothing
except TensorRT's engine/timing caches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.report import machine, percentiles  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--providers", default=None,
                        help="comma-separated preference overriding the config's (e.g. CUDAExecutionProvider)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    import onnxruntime as ort

    from cnn_service.model import CnnModel
    from mlplatform.repository import ModelRepository
    from mlplatform.runtimes.onnx import select_providers

    version = ModelRepository(args.model_repository).resolve("cnn")
    if args.providers:
        version.config.runtime.providers = args.providers.split(",")
    model = CnnModel(version)
    requested = select_providers(ort.get_available_providers(), model.config.runtime.providers,
                                 model.provider_options())
    print(json.dumps({"machine": machine(), "onnxruntime": ort.__version__, "device": ort.get_device(),
                      "available": ort.get_available_providers()}, indent=2))
    print("requested providers (in order, with options):")
    for name, opts in requested:
        print(f"  {name} {json.dumps(opts)}")
    t0 = time.perf_counter()
    model._load()
    print(f"session created in {time.perf_counter() - t0:.2f} s; got providers {model.providers} "
          f"(device {model.device})", flush=True)

    heldout = np.load(version.path / "heldout.npz")
    images, labels = heldout["images"].astype(np.float32)[:, None], heldout["labels"]
    for batch in (1, 8, 16, 32):
        x = {"image": images[:batch]}
        t0 = time.perf_counter()
        model.infer(x)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.infer(x)
            times.append(time.perf_counter() - t0)
        p = percentiles(times)
        print(f"batch {batch:2d}: first call {first * 1000:8.1f} ms; p50 {p['p50_ms']:.3f} ms, "
              f"p99 {p['p99_ms']:.3f} ms, {batch / p['p50_ms'] * 1000:.0f} images/s", flush=True)

    cpu = ort.InferenceSession(str(version.artifact_path), providers=["CPUExecutionProvider"])
    got = np.concatenate([model.infer({"image": images[i:i + 32]})["probabilities"] for i in range(0, len(images), 32)])
    ref = np.concatenate([cpu.run(["probabilities"], {"image": images[i:i + 32]})[0]
                          for i in range(0, len(images), 32)])
    recorded = model.config.parameters["metrics"]["heldout_accuracy"]
    print(f"vs CPU FP32 on {len(labels)} held-out digits: max abs diff {np.abs(got - ref).max():.3g}, "
          f"argmax agreement {(got.argmax(1) == ref.argmax(1)).mean():.4f}, "
          f"accuracy {(got.argmax(1) == labels).mean():.4f} (build: {recorded:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
