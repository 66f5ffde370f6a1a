"""Batch padding to preferred sizes: the config knob, and when a model turns it on (by device)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mlplatform.config import BatchingConfig, ModelConfig
from mlplatform.model import Model, Tensors
from mlplatform.repository import ModelVersion


def model_config(**batching: object) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "toy", "version": 1, "platform": "onnxruntime_onnx", "artifact": "model.onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        "batching": {"max_batch_size": 32, "preferred_batch_sizes": [8, 16], **batching},
        "warmup": {"batch_sizes": [1, 8]},
    })


class Toy(Model):
    """A real (numpy) model whose device is chosen by the test."""

    def __init__(self, config: ModelConfig, device: str) -> None:
        super().__init__(ModelVersion(Path("."), config))
        self._device = device
        self.seen: list[int] = []

    @property
    def device(self) -> str:
        return self._device

    def _load(self) -> None:
        pass

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        self.seen.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 2}


def test_padded_sizes_end_with_the_max_batch_size():
    assert BatchingConfig(max_batch_size=32, preferred_batch_sizes=[16, 8]).padded_sizes() == [8, 16, 32]
    assert BatchingConfig(max_batch_size=32).padded_sizes() == [32]


def test_unknown_mode_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="pad_to_preferred"):
        BatchingConfig(pad_to_preferred="sometimes")


@pytest.mark.parametrize(("mode", "device", "sizes"), [
    ("never", "gpu", []), ("never", "cpu", []),
    ("gpu", "gpu", [8, 16, 32]), ("gpu", "cpu", []),
    ("always", "cpu", [8, 16, 32]), ("always", "gpu", [8, 16, 32]),
])
def test_padding_follows_the_mode_and_the_device(mode, device, sizes):
    assert Toy(model_config(pad_to_preferred=mode), device).batch_pad_sizes() == sizes


async def test_warmup_runs_the_padded_sizes_when_padding_is_on_else_the_configured_ones():
    padded = Toy(model_config(pad_to_preferred="gpu"), "gpu")
    await padded.warmup(1)
    assert padded.seen == [8, 16, 32] and padded.ready
    plain = Toy(model_config(pad_to_preferred="gpu"), "cpu")
    await plain.warmup(1)
    assert plain.seen == [1, 8]
