"""mlplatform.model.runtime_variant: which runtime and artifact a model config selects."""

from __future__ import annotations

import pytest

from mlplatform.backends import runtime_variant
from mlplatform.config import ModelConfig


def config(platform: str = "pytorch_libtorch", options: dict | None = None) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "m", "version": 1, "platform": platform, "artifact": "model.pt",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 2]}],
        "runtime": {"options": options or {}},
    })


VARIANTS = {
    "variant": "torchscript",
    "variants": {
        "torchscript": {"backend": "torchscript", "artifact": "model.pt", "inputs": ["ids", "mask"]},
        "onnx_int8": {"backend": "onnxruntime", "artifact": "model.int8.onnx"},
    },
}


def test_without_variants_the_platform_picks_the_backend():
    assert runtime_variant(config("pytorch_libtorch")) == ("torchscript", "torchscript", {"artifact": "model.pt"})
    assert runtime_variant(config("onnxruntime_onnx"))[1] == "onnxruntime"
    with pytest.raises(ValueError, match="platform 'tensorflow' has no runtime"):
        runtime_variant(config("tensorflow"))
    with pytest.raises(ValueError, match="not in the config"):
        runtime_variant(config(), "onnx")


def test_variants_choose_by_config_or_override():
    name, backend, variant = runtime_variant(config(options=VARIANTS))
    assert (name, backend, variant["inputs"]) == ("torchscript", "torchscript", ["ids", "mask"])
    name, backend, variant = runtime_variant(config(options=VARIANTS), "onnx_int8")
    assert (name, backend, variant["artifact"]) == ("onnx_int8", "onnxruntime", "model.int8.onnx")
    with pytest.raises(ValueError, match=r"runtime variant 'onnx' is not one of \['onnx_int8', 'torchscript'\]"):
        runtime_variant(config(options=VARIANTS), "onnx")
    bad = {"variants": {"x": {"backend": "tensorrt"}}}
    with pytest.raises(ValueError, match="backend must be one of"):
        runtime_variant(config(options=bad))
