"""Deterministic build of the digit CNN: scikit-learn digits -> PyTorch CNN -> ONNX -> model repository.

Run as::

    python -m cnn_service.build_model --repository PATH [--version N] [--seed 42] [--epochs 20] [--force]

Steps: load scikit-learn's handwritten digits (1797 images, 8x8, 17 gray levels, bright ink on black),
upscale them (bilinear, `torch.nn.functional.interpolate`) to the network's 32x32 input and quantise
to 8-bit pixels, exactly what a decoded grayscale PNG holds; split 80/20 stratified; train a small CNN
(three conv-BN-ReLU-pool blocks, dropout, linear) with random shifts of up to 2 pixels; evaluate on the
held-out split; export to ONNX with a dynamic batch axis (pixel normalisation and softmax inside the
graph, so every client sends plain 0-255 pixels); check ONNX Runtime against PyTorch; and write
`model.onnx`, `model.pt` (state_dict), `model.torchscript.pt`, `config.json`, `heldout.npz` (the
held-out images and labels) and `sample.png` into `<repository>/cnn/<version>/` atomically.

The same seed gives the same weights, metrics and artifacts (one CPU thread, deterministic algorithms);
only `built_at` changes.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.build import BuildError, build_arg_parser, json_bytes, log_step, reset_clock, run_build, write_version

MODEL_NAME = "cnn"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
SIZE = 32
CLASSES = [str(d) for d in range(10)]
ARTIFACT = "model.onnx"
STATE_DICT = "model.pt"
TORCHSCRIPT = "model.torchscript.pt"
CONFIG_FILE = "config.json"
HELDOUT_FILE = "heldout.npz"
SAMPLE_FILE = "sample.png"
PARITY_TOLERANCE = 1e-4
MIN_ACCURACY = 0.95
ONNX_OPSET = 17
TEST_FRACTION = 0.2
BATCH = 64
LEARNING_RATE = 2e-3
MAX_SHIFT = 2

CONFIG_STATIC: dict[str, Any] = {
    "platform": "onnxruntime_onnx",
    "artifact": ARTIFACT,
    "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 1, SIZE, SIZE]}],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, len(CLASSES)]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]},
    ],
    # Wait up to 20 ms for batch-mates: on a GPU a batch of 32 costs little more than a batch of 1.
    # On a GPU every batch is padded to 8, 16 or 32 rows (the TensorRT profile's range): CUDA/cuDNN set up
    # each new shape on its first call, which cost 45 ms per batch on an H100 when batches of odd sizes
    # came in (BENCHMARKS.md); on CPU cost grows with rows, so batches are not padded there.
    "batching": {"max_batch_size": 32, "max_queue_delay_ms": 20.0, "max_queue_size": 1024, "latency_budget_ms": 80.0,
                 "preferred_batch_sizes": [8, 16, 32], "pad_to_preferred": "gpu"},
    "runtime": {
        "intra_op_threads": 1, "inter_op_threads": 1,
        "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "options": {
            "provider_options": {
                # Relative cache paths are resolved against the version directory; the optimisation
                # profile (batch 1 / opt / max_batch_size) is derived from the input shapes.
                "TensorrtExecutionProvider": {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": "trt_cache",
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": "trt_cache",
                    "trt_max_workspace_size": 1 << 30,
                },
                # HEURISTIC: any batch size 1-32 can come out of the batcher; EXHAUSTIVE would
                # benchmark conv algorithms on the first batch of each new size (a latency spike).
                "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"},
            },
            "tensorrt_opt_batch_size": 16,
        },
    },
    "warmup": {"batch_sizes": [1, 8, 16, 32], "iterations": 2},
}

LIMITS = {"max_image_bytes": 1 << 20, "max_image_pixels": 4096 * 4096}



@dataclass(frozen=True)
class Split:
    """Train / held-out 8-bit images [N, SIZE, SIZE] and labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --------------------------------------------------------------------------- data


def load_images(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The digits upscaled to `size` x `size`: uint8 pixels [N, size, size] (ink bright), int64 labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # 0..16 -> 0..1
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    pixels = torch.clamp(torch.round(up * 255.0), 0, 255).to(torch.uint8)[:, 0]
    return pixels.numpy(), digits.target.astype(np.int64)


def split(x: np.ndarray, y: np.ndarray, seed: int) -> Split:
    """Stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y,
                                                        random_state=seed)
    return Split(x_train, y_train, x_test, y_test)


# --------------------------------------------------------------------------- model


def make_network(mean: float, std: float) -> Any:
    """The CNN: pixels [N, 1, SIZE, SIZE] in 0..255 -> (logits [N, 10], probabilities [N, 10])."""
    import torch
    from torch import nn

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU(inplace=True), nn.MaxPool2d(2))

    class DigitCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
            self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (SIZE // 8) ** 2, len(CLASSES)))

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (image / 255.0 - self.mean) / self.std
            logits = self.head(self.features(x))
            return logits, torch.softmax(logits, dim=1)

    return DigitCNN()


def _shifted(images: Any, generator: Any) -> Any:
    """Each image moved by a random whole-pixel offset in [-MAX_SHIFT, MAX_SHIFT] (zeros shifted in)."""
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    padded = F.pad(images, (MAX_SHIFT,) * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + SIZE, dx:dx + SIZE] for i, (dy, dx) in enumerate(offsets.tolist())])


def train(data: Split, seed: int, epochs: int) -> tuple[Any, float, float]:
    """Train the CNN (deterministic); return it in eval mode with its normalisation mean and std."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x_scaled = data.x_train.astype(np.float64) / 255.0
    mean, std = round(float(x_scaled.mean()), 6), round(float(x_scaled.std()), 6)
    net = make_network(mean, std)
    x = torch.from_numpy(data.x_train.astype(np.float32))[:, None]
    y = torch.from_numpy(data.y_train)
    x_test = torch.from_numpy(data.x_test.astype(np.float32))[:, None]
    y_test = torch.from_numpy(data.y_test)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(y), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(y), BATCH):
            idx = order[start:start + BATCH]
            images = _shifted(x[idx], generator)
            logits, _ = net(images)
            loss = loss_fn(logits, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        net.eval()
        with torch.no_grad():
            test_acc = float((net(x_test)[0].argmax(1) == y_test).float().mean())
        log_step("training", f"epoch {epoch:2d}/{epochs}  loss {total / len(y):.4f}  "
                             f"train acc {correct / len(y):.4f}  held-out acc {test_acc:.4f}")
    net.eval()
    return net, mean, std


def torch_outputs(net: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch outputs for uint8 images [N, SIZE, SIZE]."""
    import torch

    with torch.no_grad():
        logits, probs = net(torch.from_numpy(images.astype(np.float32))[:, None])
    return {"logits": logits.numpy(), "probabilities": probs.numpy()}


# --------------------------------------------------------------------------- export / verify


def export_onnx(net: Any) -> bytes:
    """ONNX bytes: input `image` float[N, 1, 32, 32] (N dynamic); outputs `logits`, `probabilities` float[N, 10]."""
    import onnx
    import torch

    buf = io.BytesIO()
    example = torch.zeros(2, 1, SIZE, SIZE)
    # The TorchScript-based exporter (dynamo=False): deterministic bytes, named dynamic axes, no extra
    # dependency (onnxscript); it is deprecated in favour of torch.export but still supported in 2.13.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (example,), buf, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
            opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    inputs = [i.name for i in model.graph.input]
    outputs = tuple(o.name for o in model.graph.output)
    if inputs != [INPUT_NAME] or outputs != OUTPUT_NAMES:
        raise BuildError(f"unexpected ONNX signature: inputs {inputs}, outputs {list(outputs)}")
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_value:
        raise BuildError(f"ONNX batch axis is fixed at {batch_dim.dim_value}, expected dynamic")
    return model.SerializeToString()


def run_onnx(onnx_bytes: bytes, images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """ONNX Runtime (CPU, one thread) outputs for uint8 images [N, SIZE, SIZE], in batches of `batch`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    x = images.astype(np.float32)[:, None]
    parts = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUT_NAMES)}


def serialise_native(net: Any) -> tuple[bytes, bytes]:
    """(state_dict bytes for `torch.load`, TorchScript bytes for `torch.jit.load`)."""
    import torch

    state = io.BytesIO()
    torch.save(net.state_dict(), state)
    scripted = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit is deprecated in 2.13 but TorchScript files are still expected
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, SIZE, SIZE)), scripted)
    return state.getvalue(), scripted.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """A lossless 8-bit grayscale PNG of `pixels` [H, W]."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def heldout_bytes(data: Split) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=data.x_test, labels=data.y_test)
    return buf.getvalue()


def make_config(version: int, mean: float, std: float, metrics: dict[str, Any], seed: int,
                epochs: int) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": version,
        **CONFIG_STATIC,
        "parameters": {
            "labels": CLASSES,
            "input": {
                "height": SIZE, "width": SIZE, "channels": 1, "pixel_min": 0.0, "pixel_max": 255.0,
                "convention": "8-bit grayscale, bright ink on a dark background (like the training digits); "
                              "images are converted to grayscale and resized (bilinear) to height x width",
            },
            "normalisation": {"scale": 1 / 255, "mean": mean, "std": std,
                              "where": "inside the ONNX graph: (pixels / 255 - mean) / std"},
            "limits": LIMITS,
            "default_top_k": 3,
            "metrics": metrics,
            "build": {
                "dataset": "sklearn.datasets.load_digits (8x8, 0-16) upscaled bilinear to 32x32, uint8",
                "seed": seed, "epochs": epochs, "batch": BATCH, "learning_rate": LEARNING_RATE,
                "augmentation": f"random shifts of up to {MAX_SHIFT} px",
                "held_out_fraction": TEST_FRACTION, "onnx_opset": ONNX_OPSET,
                "parity_tolerance": PARITY_TOLERANCE,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        },
    }


# --------------------------------------------------------------------------- entry points


def build(repository: Path, version: int = 1, seed: int = 42, epochs: int = 20, force: bool = False) -> Path:
    """Build `<repository>/cnn/<version>/` (kept as is when complete, unless `force`); return it."""
    if version < 1 or epochs < 1:
        raise ValueError(f"version and epochs must be >= 1, got {version}, {epochs}")
    reset_clock()
    target = Path(repository) / MODEL_NAME / str(version)
    if not force and (target / ARTIFACT).is_file() and (target / CONFIG_FILE).is_file():
        log_step("skip", f"{target} is up to date (use --force to rebuild)")
        return target

    log_step("loading", f"sklearn digits, upscaled to {SIZE}x{SIZE} 8-bit")
    x, y = load_images(SIZE)
    data = split(x, y, seed)
    log_step("loading", f"{len(y)} images; train/held-out {len(data.y_train)}/{len(data.y_test)} (stratified)")

    log_step("training", f"CNN, {epochs} epochs, batch {BATCH}, seed {seed}")
    net, mean, std = train(data, seed, epochs)
    expected = torch_outputs(net, data.x_test)
    accuracy = float((expected["probabilities"].argmax(1) == data.y_test).mean())
    log_step("evaluating", f"held-out accuracy (PyTorch) {accuracy:.4f} on {len(data.y_test)} images")

    log_step("exporting", f"ONNX opset {ONNX_OPSET}, dynamic batch axis")
    onnx_bytes = export_onnx(net)
    state_dict, torchscript = serialise_native(net)
    log_step("exporting", f"{ARTIFACT} {len(onnx_bytes)} B, {STATE_DICT} {len(state_dict)} B, "
                          f"{TORCHSCRIPT} {len(torchscript)} B")

    log_step("verifying", f"onnxruntime vs PyTorch on {len(data.y_test)} held-out images")
    got = run_onnx(onnx_bytes, data.x_test)
    diff = max(float(np.abs(got[name] - expected[name]).max()) for name in OUTPUT_NAMES)
    onnx_accuracy = float((got["probabilities"].argmax(1) == data.y_test).mean())
    log_step("verifying", f"max abs diff {diff:.3g} (tolerance {PARITY_TOLERANCE:g}); "
                          f"held-out accuracy (ONNX Runtime) {onnx_accuracy:.4f}")
    if diff > PARITY_TOLERANCE:
        raise BuildError(f"ONNX Runtime differs from PyTorch by {diff:.3g} > {PARITY_TOLERANCE:g}")
    if onnx_accuracy < MIN_ACCURACY:
        raise BuildError(f"held-out accuracy {onnx_accuracy:.4f} is below {MIN_ACCURACY}")

    metrics = {
        "heldout_accuracy": round(onnx_accuracy, 6),
        "heldout_correct": int((got["probabilities"].argmax(1) == data.y_test).sum()),
        "heldout_images": len(data.y_test),
        "train_images": len(data.y_train),
        "parity_max_abs_diff": diff,
    }
    config = make_config(version, mean, std, metrics, seed, epochs)
    files = {
        ARTIFACT: onnx_bytes, STATE_DICT: state_dict, TORCHSCRIPT: torchscript, CONFIG_FILE: json_bytes(config),
        HELDOUT_FILE: heldout_bytes(data), SAMPLE_FILE: png_bytes(data.x_test[0]),
    }
    log_step("writing", f"{', '.join(files)} -> {target} (atomic rename)")
    target = write_version(Path(repository) / MODEL_NAME, version, files)
    log_step("writing", f"{target}: sample.png is a {CLASSES[int(data.y_test[0])]!r}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 0 on success, 1 on a failed build."""
    parser = build_arg_parser("python -m cnn_service.build_model", __doc__, seed=42)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return run_build(lambda: build(args.repository, version=args.version, seed=args.seed, epochs=args.epochs,
                                   force=args.force))

if __name__ == "__main__":
    sys.exit(main())
