"""GPU check of the sentiment TorchScript artifact through the libs runtime: device, FP16 vs FP32, timings.

Needs only torch, tokenizers and numpy (not the project's packages): it puts libs/src and
services/sentiment/src on sys.path. Copy a built version directory (model_repository/sentiment/1)
to the GPU machine with the repository and run:

    python bench/legacy/sentiment_gpu_check.py --version-dir model_repository/sentiment/1 [--out results.json]

Reports the device and precision the runtime chose (FP16 on CUDA when a GPU exists, FP32 on
CPU), the largest |p_fp16_cuda - p_fp32_cpu| over held-out texts and the label agreement, and the
median time of one call at batch sizes 1..32 for short (~20 tokens) and long (~120 tokens) texts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "libs" / "src"), str(ROOT / "services" / "sentiment" / "src"), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlplatform.runtimes.torchscript import TorchScriptSession  # noqa: E402
from sentiment_service.text import TextEncoder  # noqa: E402

DATA = ROOT / "services" / "sentiment" / "data" / "sentiment.jsonl"
SHORT = "The hotel number {i} was really lovely and I would happily recommend it to my friends."
LONG = ("The blender number {i} arrived on time and the packaging was neat, which I appreciated. " * 6).strip()


def session(version_dir: Path, device: str, precision: str, threads: int) -> TorchScriptSession:
    cfg = json.loads((version_dir / "config.json").read_text())
    variant = cfg["runtime"]["options"]["variants"]["torchscript"]
    return TorchScriptSession(version_dir / variant["artifact"], input_names=variant["inputs"],
                              output_names=variant["outputs"], intra_op_threads=threads,
                              options={"device": device, "precision": precision})


def run(sess: TorchScriptSession, encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    out = []
    for i in range(0, len(texts), 32):
        b = encoder.encode(texts[i:i + 32])
        out.append(sess.run({"input_ids": b.input_ids, "attention_mask": b.attention_mask})["probabilities"])
    return np.concatenate(out)


def timed(sess: TorchScriptSession, encoder: TextEncoder, texts: list[str], repeats: int) -> float:
    b = encoder.encode(texts)
    inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
    sess.run(inputs)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sess.run(inputs)  # copies the outputs to the CPU, which synchronises
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, default=ROOT / "model_repository" / "sentiment" / "1")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    cfg = json.loads((args.version_dir / "config.json").read_text())
    encoder = TextEncoder(args.version_dir / "tokenizer.json", cfg["parameters"]["max_sequence_length"])
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    texts, labels = [r["text"] for r in test], cfg["parameters"]["labels"]
    truth = np.array([labels.index(r["label"]) for r in test])

    auto = session(args.version_dir, "auto", "auto", args.threads)
    cpu = session(args.version_dir, "cpu", "fp32", args.threads)
    report: dict[str, object] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                                 "auto_device": auto.choice.device, "auto_precision": auto.precision}
    p_auto, p_cpu = run(auto, encoder, texts), run(cpu, encoder, texts)
    report["max_abs_diff_auto_vs_cpu_fp32"] = float(np.abs(p_auto - p_cpu).max())
    report["label_agreement"] = float((p_auto.argmax(1) == p_cpu.argmax(1)).mean())
    report["accuracy_auto"] = float((p_auto.argmax(1) == truth).mean())
    report["accuracy_cpu_fp32"] = float((p_cpu.argmax(1) == truth).mean())
    timings: dict[str, float] = {}
    for name, sess in (("auto", auto), ("cpu_fp32", cpu)):
        for kind, template in (("short", SHORT), ("long", LONG)):
            for batch in (1, 8, 32):
                key = f"{name}_{kind}_b{batch}_ms"
                timings[key] = timed(sess, encoder, [template.format(i=i) for i in range(batch)], args.repeats)
    report["median_ms"] = timings
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
