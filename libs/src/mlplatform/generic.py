"""Models from their `config.json` alone: what the generic model service (services/generic,
`GENERIC_MODELS=diabetes,other python -m generic_service`) serves over the Open Inference Protocol
for any model the repository holds as ONNX (or TorchScript), with no Python of its own
(Triton's model-repository idea).

Every model gets the shared data plane: its own batcher (the config's `batching`), breaker,
metrics, the cache, and the checks the config declares. Besides names, datatypes, shapes and
`max_batch_size`, a config may bound its inputs in `parameters.limits`:

    "limits": {"features": {"min": [18, 1, ...], "max": [90, 2, ...], "names": ["age", "sex", ...]}}

(`min` / `max` a number or one per column of a 2-D input; `names` label the columns in errors).
Floating-point inputs must be finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mlplatform.backends import OnnxModel, RuntimeModel
from mlplatform.model import Model, Tensors
from mlplatform.repository import ModelVersion


class InputLimits:
    """Bounds of one input tensor from the config: per column (2-D inputs) or for every element."""

    def __init__(self, name: str, spec: Mapping[str, Any], columns: int | None) -> None:
        self.name = name
        self.lo = np.asarray(spec.get("min", -np.inf), dtype=np.float64)
        self.hi = np.asarray(spec.get("max", np.inf), dtype=np.float64)
        self.names: list[str] = [str(n) for n in spec.get("names", [])]
        for what, arr in (("min", self.lo), ("max", self.hi)):
            if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != columns):
                raise ValueError(f"parameters.limits.{name}.{what}: a number or one value per column "
                                 f"({columns} columns)")
        if self.names and len(self.names) != columns:
            raise ValueError(f"parameters.limits.{name}.names: {len(self.names)} names for {columns} columns")

    def _label(self, column: int) -> str:
        return f"{self.name}[{column}] ({self.names[column]})" if self.names else f"{self.name}[{column}]"

    def out_of_bounds(self, x: np.ndarray) -> np.ndarray:
        """Per row of a batch: whether any element is outside the bounds (one vectorised pass)."""
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        return ((flat < self.lo) | (flat > self.hi)).any(axis=1)

    def problem(self, row: np.ndarray) -> str | None:
        """Why one row's values are out of bounds (the first bad element, by position), or None."""
        flat = row.reshape(-1).astype(np.float64)
        lo = np.broadcast_to(self.lo, flat.shape) if self.lo.ndim == 0 else self.lo
        hi = np.broadcast_to(self.hi, flat.shape) if self.hi.ndim == 0 else self.hi
        bad = (flat < lo) | (flat > hi)
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        label = self._label(i) if row.ndim == 1 else f"{self.name} element {i}"
        return f"{label} = {flat[i]:g} is outside [{lo[i]:g}, {hi[i]:g}]"


class ConfigChecks:
    """Row checks a `config.json` declares (mixed into the generic models); a bad declaration stops
    start-up, naming the field."""

    config: Any
    inputs: Any

    def __init__(self, version: ModelVersion, *args: Any, **kwargs: Any) -> None:
        super().__init__(version, *args, **kwargs)  # type: ignore[call-arg]
        declared = self.config.parameters.get("limits") or {}
        specs = {s.name: s for s in self.inputs}
        unknown = sorted(set(declared) - set(specs))
        if unknown:
            raise ValueError(f"parameters.limits names unknown inputs {unknown}")
        self.input_limits = {name: InputLimits(name, spec, specs[name].shape[1] if len(specs[name].shape) == 2
                                               else None) for name, spec in declared.items()}

    def validate_rows(self, inputs: Mapping[str, np.ndarray]) -> list[str | None]:
        """Per row: the first non-finite float or out-of-bounds value, naming the input and column."""
        rows = next(iter(inputs.values())).shape[0]
        problems: list[str | None] = [None] * rows
        for name, x in inputs.items():
            if x.dtype.kind == "f":
                flat = x.reshape(rows, -1)
                for i in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                    j = int(np.argmax(~np.isfinite(flat[i])))
                    problems[i] = problems[i] or f"{name} element {j} is {flat[i, j]}, not a finite number"
            limits = self.input_limits.get(name)
            if limits is not None:
                for i in np.flatnonzero(limits.out_of_bounds(x)):
                    problems[i] = problems[i] or limits.problem(x[i])
        return problems

    def warmup_inputs(self, batch_size: int) -> Tensors:
        """Zeros, or each column's mid-range where the config bounds it (valid rows either way)."""
        out = Model.warmup_inputs(self, batch_size)  # type: ignore[arg-type]
        for name, lim in self.input_limits.items():
            bounded = np.isfinite(lim.lo) & np.isfinite(lim.hi)
            mid = np.where(bounded, (lim.lo + lim.hi) / 2, np.clip(0.0, lim.lo, lim.hi))
            out[name] = np.broadcast_to(mid, out[name].shape).astype(out[name].dtype)
        return out


class GenericOnnxModel(ConfigChecks, OnnxModel):
    """An ONNX model from its config alone."""


class GenericRuntimeModel(ConfigChecks, RuntimeModel):
    """A TorchScript (or variant-selected) model from its config alone."""


def load(version: ModelVersion) -> Model:
    """The generic model for a version: ONNX Runtime for `onnxruntime_onnx` without variants, else RuntimeModel."""
    config = version.config
    if config.platform == "onnxruntime_onnx" and not config.runtime.options.get("variants"):
        return GenericOnnxModel(version)
    return GenericRuntimeModel(version)
