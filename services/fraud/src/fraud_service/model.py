"""The fraud model: an XGBoost classifier exported to ONNX, with range validation and a rule-based fallback."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fraud_service.fallback import rule_based_probability
from mlplatform.backends import OnnxModel
from mlplatform.model import Tensors
from mlplatform.repository import ModelVersion

INPUT = "features"
PROBABILITIES = "probabilities"
LABEL = "label"


@dataclass(frozen=True)
class Feature:
    name: str
    min: float
    max: float


class FraudModel(OnnxModel):
    """Scores `features` [N, F] float32 rows; `probabilities[:, 1]` is the fraud probability."""

    def __init__(self, version: ModelVersion) -> None:
        super().__init__(version)
        params = self.config.parameters
        try:
            self.features = [Feature(f["name"], float(f["min"]), float(f["max"])) for f in params["features"]]
            self.threshold = float(params["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"fraud v{self.version} config: parameters need 'features' "
                             f"(name, min, max) and 'threshold': {exc}") from None
        width = self.config.inputs[0].shape[1]
        if len(self.features) != width:
            raise ValueError(f"fraud v{self.version} config: {len(self.features)} features declared, "
                             f"input has {width} columns")
        self.feature_names = [f.name for f in self.features]
        self._lo = np.array([f.min for f in self.features], dtype=np.float32)
        self._hi = np.array([f.max for f in self.features], dtype=np.float32)
        if not (np.isfinite(self._lo).all() and np.isfinite(self._hi).all()):
            raise ValueError(f"fraud v{self.version} config: feature ranges must be finite")

    @property
    def n_features(self) -> int:
        return len(self.features)

    def row_problem(self, row: np.ndarray) -> str | None:
        """Why one feature row is invalid (naming the feature), or None."""
        if row.shape != (self.n_features,):
            return f"features: expected {self.n_features} values, got {row.shape[0] if row.ndim else 0}"
        bad = ~np.isfinite(row)
        if bad.any():
            i = int(np.argmax(bad))
            return f"features[{i}] ({self.feature_names[i]}) is {row[i]}, not a finite number"
        out = (row < self._lo) | (row > self._hi)
        if out.any():
            i = int(np.argmax(out))
            return (f"features[{i}] ({self.feature_names[i]}) = {row[i]:g} is outside "
                    f"[{self._lo[i]:g}, {self._hi[i]:g}]")
        return None

    def validate_rows(self, inputs: Mapping[str, np.ndarray]) -> list[str | None]:
        x = inputs[INPUT]
        # NaN fails both comparisons and the bounds are finite, so the range check also refuses NaN and inf
        ok = ((x >= self._lo) & (x <= self._hi)).all(axis=1)
        return [None if good else self.row_problem(x[i]) for i, good in enumerate(ok)]

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run the ONNX model; `label` applies this version's tuned threshold (ONNX's own cut-off is 0.5)."""
        outputs = super().infer(inputs)
        outputs[LABEL] = (outputs[PROBABILITIES][:, 1] >= self.threshold).astype(np.int64)
        return outputs

    def warmup_inputs(self, batch_size: int) -> Tensors:
        """Mid-range rows: valid for every feature."""
        mid = (self._lo + self._hi) / 2
        return {INPUT: np.tile(mid, (batch_size, 1)).astype(np.float32)}

    def fallback(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Rule-based probabilities (see fraud_service.fallback), in the model's output format."""
        p1 = rule_based_probability(inputs[INPUT], self.feature_names).astype(np.float32)
        return {
            LABEL: (p1 >= self.threshold).astype(np.int64),
            PROBABILITIES: np.stack([1.0 - p1, p1], axis=1).astype(np.float32),
        }
