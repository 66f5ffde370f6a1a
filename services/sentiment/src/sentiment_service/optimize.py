"""CPU candidates made from the FP32 ONNX export: a fused transformer graph and INT8 quantisations.

- `fuse_transformer`: ONNX Runtime's transformer optimiser (model type bert): multi-head
  attention into one `Attention` node, residual + LayerNorm into `SkipLayerNormalization`,
  bias + GELU into `BiasGelu`. Exact in FP32.
- `quantize_dynamic_int8`: weights to INT8 ahead of time (per tensor, or per output channel),
  activations quantised per batch at run time; the classifier head stays FP32 unless asked.
- `quantize_static_int8`: QDQ INT8 with activation ranges calibrated on training sentences
  (MinMax), weights per channel, and the sensitive MatMuls left in FP32: those whose input
  activation loses the most to 8-bit rounding with the calibrated range (`activation_sqnr`).

Every function takes and returns model bytes; files only live in a temporary directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlplatform.optimize.quantize import (
    SENSITIVE_SQNR_DB,
    Feeds,
    StaticInt8,
    activation_sqnr,
    quantize_dynamic_int8,
    quantize_static_qdq,
)

__all__ = ["SENSITIVE_SQNR_DB", "Feeds", "StaticInt8", "activation_sqnr", "fuse_transformer",
           "quantize_dynamic_int8", "quantize_static_int8"]
# The quantisers live in mlplatform.optimize.quantize (shared with the optimisation toolkit); in MiniLM the
# sensitive activations are the FFN's inputs (after LayerNorm and after GELU): long-tailed.


def fuse_transformer(onnx_bytes: bytes, num_heads: int, hidden_size: int) -> tuple[bytes, dict[str, int]]:
    """The fused graph and the count of each fused operator (Attention, SkipLayerNormalization, ...)."""
    from onnxruntime.transformers import optimizer

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "fused.onnx"
        src.write_bytes(onnx_bytes)
        fused = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                         opt_level=0, use_gpu=False)
        fused.save_model_to_file(str(dst))
        stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        return dst.read_bytes(), stats


def quantize_static_int8(onnx_bytes: bytes, calibration: Sequence[Feeds], probe: Sequence[Feeds],
                         threshold_db: float = SENSITIVE_SQNR_DB) -> StaticInt8:
    """Static QDQ INT8 of the MatMuls (MinMax calibration on `calibration`, weights per channel), then again with
    the MatMuls whose activation SQNR on `probe` is under `threshold_db` left in FP32."""
    return quantize_static_qdq(onnx_bytes, calibration, probe, op_types=["MatMul"], threshold_db=threshold_db)
