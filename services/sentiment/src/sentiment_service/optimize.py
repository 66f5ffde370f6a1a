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

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]

# An activation whose 8-bit rounding (calibrated range) keeps less signal than this stays FP32 in the
# static variant. In MiniLM these are the FFN's inputs (after LayerNorm and after GELU): long-tailed.
SENSITIVE_SQNR_DB = 25.0


@dataclass(frozen=True)
class StaticInt8:
    """A statically quantised model, the MatMuls left in FP32 and every MatMul's activation SQNR (dB)."""

    model: bytes
    excluded: list[str]
    sqnr_db: dict[str, float]


def _quiet() -> None:
    # The quantiser's advice to run pre-processing is logged on the root logger at WARNING; we do run it.
    logging.getLogger().setLevel(logging.ERROR)


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


def quantize_dynamic_int8(onnx_bytes: bytes, *, per_channel: bool, op_types: Sequence[str]) -> bytes:
    """Dynamic INT8: weights of `op_types` nodes quantised (per channel or per tensor), activations at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        # Fused contrib ops have no ONNX shape inference: their outputs are FP32.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return dst.read_bytes()


def _reader(feeds: Sequence[Feeds]) -> Any:
    """Calibration feeds as the quantiser's CalibrationDataReader."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> Feeds | None:
            return next(self._it, None)

    return Reader()


def _qdq_matmul_activations(model_path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list[str]]]:
    """From a QDQ model: each quantised activation's (scale, zero point), and each MatMul's quantised activations."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    params = {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    users: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in params:
                users.setdefault(node.name, []).append(q.input[0])
    return params, users


def activation_sqnr(float_path: Path, qdq_path: Path, feeds: Sequence[Feeds]) -> dict[str, float]:
    """Per quantised MatMul: the worst signal-to-quantisation-noise ratio (dB) of its input activations, each
    rounded to 8 bits with the calibrated scale and zero point, over `feeds` run through the float model."""
    import onnx
    import onnxruntime as ort

    params, users = _qdq_matmul_activations(qdq_path)
    model = onnx.load(str(float_path))
    for name in params:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    signal = dict.fromkeys(params, 0.0)
    noise = dict.fromkeys(params, 0.0)
    for feed in feeds:
        outs = dict(zip(names, session.run(None, feed), strict=True))
        for name, (scale, zero) in params.items():
            x = outs[name].astype(np.float64)
            lo, hi = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
            q = np.clip(np.round(x / scale) + zero.astype(np.float64), lo, hi)
            signal[name] += float((x ** 2).sum())
            noise[name] += float(((x - (q - zero.astype(np.float64)) * scale) ** 2).sum())
    db = {name: 10 * np.log10(signal[name] / max(noise[name], 1e-30)) for name in params}
    return {node: round(float(min(db[a] for a in acts)), 2) for node, acts in users.items()}


def quantize_static_int8(onnx_bytes: bytes, calibration: Sequence[Feeds], probe: Sequence[Feeds],
                         threshold_db: float = SENSITIVE_SQNR_DB) -> StaticInt8:
    """Static QDQ INT8 (MinMax calibration on `calibration`, weights per channel, MatMuls only), then again with
    the MatMuls whose activation SQNR on `probe` is under `threshold_db` left in FP32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, full, out = (Path(tmp) / n for n in ("model.onnx", "pre.onnx", "all.onnx", "int8.onnx"))
        src.write_bytes(onnx_bytes)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

        def quantize(dst: Path, exclude: list[str]) -> None:
            quantize_static(str(pre), str(dst), _reader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude)

        quantize(full, [])
        sqnr = activation_sqnr(pre, full, probe)
        excluded = sorted(n for n, db in sqnr.items() if db < threshold_db)
        quantize(out, excluded)
        return StaticInt8(out.read_bytes(), excluded, dict(sorted(sqnr.items(), key=lambda kv: kv[1])))
