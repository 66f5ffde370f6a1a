"""The sentiment model as the optimisation toolkit's subject (`python -m mlplatform.optimize --model sentiment`).

The FP32 network is a built version's eager model (`model.pt`, `encoder_config.json`), the
held-out and training sentences those of the build's data file, tokenised with the version's
tokenizer and padded per batch. The encoder-specific graph optimisation is ONNX Runtime's
transformer fusion (`sentiment_service.optimize.fuse_transformer`), the INT8 nodes the MatMuls
(as the build's own candidates). Structured pruning removes whole Transformer layers (every
other one); `prune_structure` can remove attention heads too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlplatform.optimize.subject import Subject
from sentiment_service import build_model, optimize
from sentiment_service.network import SentimentNetwork, load_network
from sentiment_service.text import TextEncoder

DEFAULT_VERSION_DIR = Path("model_repository") / build_model.MODEL_NAME / "1"
KEEP_LAYERS = (0, 2, 4)


def prune_heads(attention: nn.ModuleDict, keep: int) -> int:
    """Keep the `keep` heads of one attention block with the largest query/key/value/output weight norms."""
    sa, out = attention["self"], attention["output"]["dense"]
    d = sa.head_dim
    with torch.no_grad():
        norms = torch.tensor([sum(float(lin.weight[h * d:(h + 1) * d].norm()) for lin in (sa.query, sa.key, sa.value))
                              + float(out.weight[:, h * d:(h + 1) * d].norm()) for h in range(sa.heads)])
    heads = torch.sort(torch.topk(norms, keep).indices).values
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])
    for name in ("query", "key", "value"):
        lin = getattr(sa, name)
        new = nn.Linear(lin.in_features, len(idx))
        new.weight.data, new.bias.data = lin.weight.data[idx].clone(), lin.bias.data[idx].clone()
        setattr(sa, name, new)
    new_out = nn.Linear(len(idx), out.out_features)
    new_out.weight.data, new_out.bias.data = out.weight.data[:, idx].clone(), out.bias.data.clone()
    attention["output"]["dense"] = new_out
    sa.heads = keep
    return keep


def prune_structure(net: SentimentNetwork, keep_layers: Sequence[int] | None = KEEP_LAYERS,
                    keep_heads: int | None = None) -> tuple[SentimentNetwork, str]:
    """A smaller dense encoder: only Transformer layers `keep_layers` (None: all) and, in each, the `keep_heads`
    attention heads with the largest weight norms (None: all). The toolkit's default removes every other layer:
    half the encoder's compute (heads alone leave the FFN, two thirds of a layer's MatMul work, as it was)."""
    layers = net.bert.encoder["layer"]
    total, heads = len(layers), layers[0].attention["self"].heads
    what = []
    if keep_layers is not None:
        net.bert.encoder["layer"] = nn.ModuleList(layers[i] for i in keep_layers)
        what.append(f"Transformer layers {total}->{len(keep_layers)} (kept {list(keep_layers)})")
    if keep_heads is not None:
        for layer in net.bert.encoder["layer"]:
            prune_heads(layer.attention, keep_heads)
        what.append(f"attention heads {heads}->{keep_heads} per layer (largest Q/K/V/output weight norms)")
    return net, ", ".join(what) or "nothing removed"


def subject(version_dir: Path | str = DEFAULT_VERSION_DIR, **_: Any) -> Subject:
    """The sentiment Subject of a built version."""
    version_dir = Path(version_dir)
    config = json.loads((version_dir / "config.json").read_text())
    params = config["parameters"]
    labels_names = list(params["labels"])
    net = load_network(version_dir)
    encoder = TextEncoder(version_dir / params["tokenizer"], int(params["max_sequence_length"]))
    examples = build_model.load_examples()
    train = [e for e in examples if e.split == "train"]
    test = [e for e in examples if e.split == "test"]
    test_texts = [e.text for e in test]
    enc_cfg = json.loads((version_dir / "encoder_config.json").read_text())
    train_y = torch.tensor([e.label for e in train])

    def feeds(texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = encoder.encode(list(texts))
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    def loss(model: Any, idx: Sequence[int]) -> Any:
        f = feeds([train[i].text for i in idx])
        logits = model.logits(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))
        return nn.functional.cross_entropy(logits, train_y[list(idx)])

    def fuse(onnx_bytes: bytes) -> tuple[bytes, dict[str, int]]:
        return optimize.fuse_transformer(onnx_bytes, enc_cfg["num_attention_heads"], enc_cfg["hidden_size"])

    axes = {0: "batch", 1: "sequence"}
    return Subject(
        name=build_model.MODEL_NAME, net=net, input_names=list(build_model.RUNTIME_INPUTS),
        output_names=list(build_model.RUNTIME_OUTPUTS), probabilities="probabilities",
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "probabilities": {0: "batch"}},
        heldout=lambda idx: feeds([test_texts[i] for i in idx]), labels=np.array([e.label for e in test]),
        train=lambda idx: feeds([train[i].text for i in idx]), train_size=len(train), loss=loss,
        structured=prune_structure, int8_ops=["MatMul"], learning_rate=5e-5, fuse=fuse,
        fusion_name="ORT transformer fusion (Attention, SkipLayerNormalization, BiasGelu)",
        description=f"sentiment: MiniLM-L6 encoder + mean pooling + linear head, {version_dir}", batch_size=16,
        gateway_request=lambda i: ("/api/v1/sentiment", {"text": test_texts[i]}),
        extra={"version_dir": str(version_dir), "batching": config.get("batching"),
               "finetune_steps": 60, "quick_finetune_steps": 4,
               "quick_eval_rows": 64, "throughput_rows": 128, "latency_rows": 150,
               "parity_tolerance": build_model.PARITY_TOLERANCE,
               "gateway_label": lambda payload: labels_names.index(payload["prediction"]["label"])},
    )
