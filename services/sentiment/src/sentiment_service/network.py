"""The sentiment network in plain PyTorch: a BERT encoder (MiniLM-L6 shape), mean pooling, a linear head.

Used by the model build (fine-tuning, TorchScript trace, ONNX export) and by tests that
compare the served answers with the eager model. Serving loads the exported artifacts and
never imports this module. Weights load from the MiniLM `model.safetensors` (encoder) and
from a version's `model.pt` state dict (encoder + head).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Added to the attention scores of padding positions: large enough that softmax gives them ~0,
# small enough to stay finite in FP16 (a -inf or finfo.min bias times a 0 mask would give NaN).
MASK_BIAS = -10000.0


@dataclass(frozen=True)
class EncoderConfig:
    """The fields of a Hugging Face BERT `config.json` that the network needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1

    @classmethod
    def from_file(cls, path: Path) -> EncoderConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only BERT encoders with gelu and absolute positions are supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.size(0), x.size(1)
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        context = torch.matmul(scores.softmax(dim=-1), v)
        return context.transpose(1, 2).reshape(h.size(0), h.size(1), self.heads * self.head_dim)


class Layer(nn.Module):
    """One post-LayerNorm Transformer block with BERT's parameter names."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({
            "self": SelfAttention(cfg),
            "output": nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.hidden_size),
                                     "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)}),
        })
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.intermediate_size)})
        self.output = nn.ModuleDict({"dense": nn.Linear(cfg.intermediate_size, cfg.hidden_size),
                                     "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)})
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        att_out = self.attention["output"]
        a = self.attention["self"](h, bias)
        h = att_out["LayerNorm"](h + self.dropout(att_out["dense"](a)))
        m = self.output["dense"](F.gelu(self.intermediate["dense"](h)))
        return self.output["LayerNorm"](h + self.dropout(m))


class Encoder(nn.Module):
    """BERT embeddings + layers; returns the last hidden states [B, S, H]."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            "position_embeddings": nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size),
            "token_type_embeddings": nn.Embedding(cfg.type_vocab_size, cfg.hidden_size),
            "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),
        })
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))})
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        positions = emb["position_embeddings"].weight[: input_ids.size(1)]
        h = emb["word_embeddings"](input_ids) + positions + emb["token_type_embeddings"].weight[0]
        h = self.dropout(emb["LayerNorm"](h))
        bias = ((1.0 - attention_mask[:, None, None, :].type_as(h)) * MASK_BIAS)
        for layer in self.encoder["layer"]:
            h = layer(h, bias)
        return h


class SentimentNetwork(nn.Module):
    """input_ids, attention_mask (int64 [B, S]) -> class probabilities (float32 [B, C])."""

    def __init__(self, cfg: EncoderConfig, num_labels: int) -> None:
        super().__init__()
        self.bert = Encoder(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).type_as(h)
        pooled = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids, attention_mask).float().softmax(dim=-1)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file (F32/I64 only), read with numpy: no extra dependency."""
    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data, dtype=dtypes[meta["dtype"]], count=(end - start) // np.dtype(
            dtypes[meta["dtype"]]).itemsize, offset=base + start).reshape(meta["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def load_pretrained_encoder(net: SentimentNetwork, safetensors_path: Path) -> None:
    """Copy the MiniLM encoder weights into `net.bert` (the pooler and position_ids are not used)."""
    weights = {k.removeprefix("bert."): v for k, v in read_safetensors(safetensors_path).items()
               if not k.startswith(("pooler.", "bert.pooler.")) and not k.endswith("position_ids")}
    missing, unexpected = net.bert.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{safetensors_path}: weights do not fit the encoder: missing {missing}, "
                         f"unexpected {unexpected}")


def load_network(version_dir: Path) -> SentimentNetwork:
    """The eager network of a built version (its `encoder_config.json`, `labels` and `model.pt`), in eval mode."""
    version_dir = Path(version_dir)
    params = json.loads((version_dir / "config.json").read_text())["parameters"]
    net = SentimentNetwork(EncoderConfig.from_file(version_dir / "encoder_config.json"), len(params["labels"]))
    net.load_state_dict(torch.load(version_dir / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()
