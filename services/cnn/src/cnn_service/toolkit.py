"""The digit CNN as the optimisation toolkit's subject (`python -m mlplatform.optimize --model cnn`).

The FP32 network comes from a built version (`model.pt` with the config's normalisation), the
held-out set from its `heldout.npz`, the training images from the same deterministic split the
build made (calibration for static INT8, fine-tuning after pruning). Structured pruning keeps
the half of each conv block's channels with the largest BatchNorm-scaled filter norms.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnn_service import build_model
from mlplatform.optimize.subject import Subject

DEFAULT_VERSION_DIR = Path("model_repository") / build_model.MODEL_NAME / "1"


def load_network(version_dir: Path) -> Any:
    """The eager FP32 CNN of a built version, in eval mode."""
    config = json.loads((Path(version_dir) / build_model.CONFIG_FILE).read_text())
    norm = config["parameters"]["normalisation"]
    net = build_model.make_network(norm["mean"], norm["std"])
    net.load_state_dict(torch.load(Path(version_dir) / build_model.STATE_DICT, map_location="cpu", weights_only=True))
    return net.eval()


def _keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    k = max(1, round(len(scores) * fraction))
    return torch.sort(torch.topk(scores, k).indices).values


def prune_channels(net: Any, keep: float = 0.5) -> tuple[Any, str]:
    """A smaller dense CNN: each conv block keeps `keep` of its output channels (largest |gamma| x filter L1);
    the next conv's inputs and the linear head's columns follow."""
    blocks = list(net.features)
    kept_in = torch.arange(blocks[0][0].in_channels)
    widths = []
    for block in blocks:
        conv, bn = block[0], block[1]
        scores = bn.weight.detach().abs() * conv.weight.detach().abs().sum(dim=(1, 2, 3))
        kept = _keep(scores, keep)
        new_conv = nn.Conv2d(len(kept_in), len(kept), conv.kernel_size, padding=conv.padding, bias=False)
        new_conv.weight.data = conv.weight.data[kept][:, kept_in].clone()
        new_bn = nn.BatchNorm2d(len(kept), eps=bn.eps, momentum=bn.momentum)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).data = getattr(bn, name).data[kept].clone()
        block[0], block[1] = new_conv, new_bn
        widths.append((conv.out_channels, len(kept)))
        kept_in = kept
    linear = net.head[-1]
    spatial = (build_model.SIZE // 8) ** 2  # the last block's feature map, flattened channel-major
    cols = (kept_in[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
    new_linear = nn.Linear(len(cols), linear.out_features)
    new_linear.weight.data = linear.weight.data[:, cols].clone()
    new_linear.bias.data = linear.bias.data.clone()
    net.head[-1] = new_linear
    return net, "conv channels " + ", ".join(f"{a}->{b}" for a, b in widths) + " (BN-scaled filter L1), head follows"


def subject(version_dir: Path | str = DEFAULT_VERSION_DIR, **_: Any) -> Subject:
    """The cnn Subject of a built version."""
    version_dir = Path(version_dir)
    config = json.loads((version_dir / build_model.CONFIG_FILE).read_text())
    net = load_network(version_dir)
    held = np.load(version_dir / build_model.HELDOUT_FILE)
    images, labels = held["images"], held["labels"].astype(np.int64)
    x, y = build_model.load_images(build_model.SIZE)
    data = build_model.split(x, y, int(config["parameters"]["build"]["seed"]))
    x_train = torch.from_numpy(data.x_train.astype(np.float32))[:, None]
    y_train = torch.from_numpy(data.y_train)
    name = build_model.INPUT_NAME

    def heldout(idx: Sequence[int]) -> dict[str, np.ndarray]:
        return {name: images[list(idx)].astype(np.float32)[:, None]}

    def train(idx: Sequence[int]) -> dict[str, np.ndarray]:
        return {name: x_train[list(idx)].numpy()}

    def loss(model: Any, idx: Sequence[int]) -> Any:
        logits, _ = model(x_train[list(idx)])
        return nn.functional.cross_entropy(logits, y_train[list(idx)])

    def gateway_request(i: int) -> tuple[str, dict[str, Any]]:
        # The held-out image as a lossless PNG (what a device would upload): the same pixels the edge model sees.
        return "/api/v1/cnn", {"image": base64.b64encode(build_model.png_bytes(images[i])).decode(), "top_k": 1}

    return Subject(
        name=build_model.MODEL_NAME, net=net, input_names=[name], output_names=list(build_model.OUTPUT_NAMES),
        probabilities="probabilities",
        dynamic_axes={name: {0: "batch"}, **{o: {0: "batch"} for o in build_model.OUTPUT_NAMES}},
        heldout=heldout, labels=labels, train=train, train_size=len(y_train), loss=loss,
        structured=prune_channels, int8_ops=["Conv", "MatMul", "Gemm"], learning_rate=1e-3,
        description=f"digit CNN (3 conv-BN-ReLU-pool blocks + linear), {version_dir}",
        gateway_request=gateway_request, batch_size=32,
        extra={"version_dir": str(version_dir), "batching": config.get("batching"),
               "finetune_steps": 300, "quick_finetune_steps": 60,
               "parity_tolerance": build_model.PARITY_TOLERANCE,
               "gateway_label": lambda payload: int(payload["classification"]["classes"][0]["label"])},
    )
