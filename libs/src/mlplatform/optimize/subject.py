"""What the toolkit needs to know about a model: a `Subject`, provided by the model's service."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]

SUBJECTS: dict[str, str] = {
    "cnn": "cnn_service.toolkit:subject",
    "sentiment": "sentiment_service.toolkit:subject",
}
"""Model name -> `module:function` returning its Subject (a later model adds a line, or passes --subject)."""


@dataclass
class Subject:
    """A trained PyTorch model as the toolkit sees it.

    `net(*inputs)` takes torch tensors named `input_names` (in order) and returns `output_names`
    (one tensor or a tuple); `probabilities` names the output holding class probabilities.
    `heldout(idx)` / `train(idx)` give numpy feeds for those rows (a text model pads per batch);
    `loss(net, idx)` is the fine-tune loss on training rows `idx` (net in train mode).
    `structured(net)` returns a smaller dense network (channels, heads or layers removed) and a
    sentence saying what was removed. `fuse(onnx_bytes)` optionally applies a model-specific graph
    fusion (the transformer optimiser for an encoder) and returns the fused bytes and fused-op counts.
    """

    name: str
    net: Any
    input_names: list[str]
    output_names: list[str]
    probabilities: str
    dynamic_axes: dict[str, dict[int, str]]
    heldout: Callable[[Sequence[int]], Feeds]
    labels: np.ndarray
    train: Callable[[Sequence[int]], Feeds]
    train_size: int
    loss: Callable[[Any, Sequence[int]], Any]
    structured: Callable[[Any], tuple[Any, str]]
    int8_ops: list[str]
    learning_rate: float = 1e-3
    fuse: Callable[[bytes], tuple[bytes, dict[str, int]]] | None = None
    fusion_name: str = "ORT graph optimisations (extended: constant folding, node fusions), saved offline"
    description: str = ""
    batch_size: int = 32
    """Rows per batch for accuracy and fine-tuning."""
    gateway_request: Callable[[int], tuple[str, Mapping[str, Any]]] | None = None
    """Held-out row -> (REST path, JSON body) of the same prediction through the gateway."""
    extra: dict[str, Any] = field(default_factory=dict)

    def example(self, rows: int = 2) -> tuple[Any, ...]:
        """Torch inputs of `rows` held-out rows, in `input_names` order (for tracing and export)."""
        import torch

        feeds = self.heldout(list(range(rows)))
        return tuple(torch.from_numpy(feeds[n]) for n in self.input_names)


def load_subject(model: str, spec: str | None = None, **kwargs: Any) -> Subject:
    """The Subject of `model` from `spec` (`module:function`) or the known SUBJECTS; kwargs go to the function."""
    target = spec or SUBJECTS.get(model)
    if target is None:
        raise ValueError(f"model {model!r} has no optimisation subject; known: {sorted(SUBJECTS)} "
                         "(or pass --subject module:function)")
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func or "subject")(**kwargs)
