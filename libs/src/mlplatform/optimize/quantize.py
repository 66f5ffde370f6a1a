"""INT8 quantisation of ONNX models with ONNX Runtime: dynamic, and static QDQ calibrated on training data.

- `quantize_dynamic_int8`: weights to INT8 ahead of time (per tensor or per output channel),
  activations quantised per batch at run time (so a row's answer depends on its batch-mates).
- `quantize_static_qdq`: QDQ INT8 with activation ranges calibrated (MinMax) on training
  batches, weights per channel, then quantised again with the sensitive nodes left in FP32:
  those whose input activation keeps the least signal when rounded to 8 bits with its
  calibrated range (`activation_sqnr`, measured on further training batches, the probe).

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

SENSITIVE_SQNR_DB = 25.0
"""An activation whose 8-bit rounding (calibrated range) keeps less signal than this (dB) stays FP32."""


@dataclass(frozen=True)
class StaticInt8:
    """A statically quantised model, the nodes left in FP32 and every quantised node's activation SQNR (dB)."""

    model: bytes
    excluded: list[str]
    sqnr_db: dict[str, float]


def quiet_quantizer() -> None:
    """The quantiser logs its advice to run pre-processing on the root logger at WARNING; we do run it."""
    logging.getLogger().setLevel(logging.ERROR)


def quantize_dynamic_int8(onnx_bytes: bytes, *, per_channel: bool, op_types: Sequence[str]) -> bytes:
    """Dynamic INT8: weights of `op_types` nodes quantised (per channel or per tensor), activations at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet_quantizer()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        # Fused contrib ops have no ONNX shape inference: their outputs are FP32.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return dst.read_bytes()


def calibration_reader(feeds: Sequence[Feeds]) -> Any:
    """Calibration feeds as the quantiser's CalibrationDataReader."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> Feeds | None:
            return next(self._it, None)

    return Reader()


def qdq_activations(model_path: Path, op_types: Sequence[str]) -> tuple[
        dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list[str]]]:
    """From a QDQ model: each quantised activation's (scale, zero point), and each `op_types` node's quantised
    input activations."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    params = {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits
              and len(n.input) > 2 and n.input[2] in inits}
    users: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in params:
                users.setdefault(node.name, []).append(q.input[0])
    return params, users


def activation_sqnr(float_path: Path, qdq_path: Path, feeds: Sequence[Feeds],
                    op_types: Sequence[str] = ("MatMul",)) -> dict[str, float]:
    """Per quantised `op_types` node: the worst signal-to-quantisation-noise ratio (dB) of its input activations,
    each rounded to 8 bits with the calibrated scale and zero point, over `feeds` run through the float model."""
    import onnx
    import onnxruntime as ort

    params, users = qdq_activations(qdq_path, op_types)
    model = onnx.load(str(float_path))
    # Only activations the float model has (a quantised graph output is renamed `<name>_QuantizeLinear_Input`).
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    params = {name: p for name, p in params.items() if name in produced}
    users = {node: kept for node, acts in users.items() if (kept := [a for a in acts if a in params])}
    outputs = {o.name for o in model.graph.output}
    for name in params:
        if name not in outputs:
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
    db = {name: 10 * np.log10(max(signal[name], 1e-30) / max(noise[name], 1e-30)) for name in params}
    return {node: round(float(min(db[a] for a in acts)), 2) for node, acts in users.items()}


def quantize_static_qdq(onnx_bytes: bytes, calibration: Sequence[Feeds], probe: Sequence[Feeds], *,
                        op_types: Sequence[str] = ("MatMul",),
                        threshold_db: float = SENSITIVE_SQNR_DB) -> StaticInt8:
    """Static QDQ INT8 of the `op_types` nodes (MinMax calibration on `calibration`, activations uint8, weights
    int8 per channel), then again with the nodes whose activation SQNR on `probe` is under `threshold_db` in FP32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quiet_quantizer()
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, full, out = (Path(tmp) / n for n in ("model.onnx", "pre.onnx", "all.onnx", "int8.onnx"))
        src.write_bytes(onnx_bytes)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

        def quantize(dst: Path, exclude: list[str]) -> None:
            quantize_static(str(pre), str(dst), calibration_reader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(op_types), calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude)

        quantize(full, [])
        sqnr = activation_sqnr(pre, full, probe, op_types)
        excluded = sorted(n for n, db in sqnr.items() if db < threshold_db)
        quantize(out, excluded)
        return StaticInt8(out.read_bytes(), excluded, dict(sorted(sqnr.items(), key=lambda kv: kv[1])))
