"""The digit CNN: a model taking 0-255 pixels [N, 1, H, W], with its labels and input limits.

Served by ONNX Runtime from `model.onnx`, or by any runtime variant its config lists (the
optimisation toolkit's formats, `python -m mlplatform.optimize --model cnn --install DIR`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cnn_service.images import ImageLimits, pixel_problem
from mlplatform.backends import RuntimeModel
from mlplatform.repository import ModelVersion

INPUT = "image"
PROBABILITIES = "probabilities"


class CnnModel(RuntimeModel):
    """Classifies `image` [N, 1, H, W] float32 pixels; `probabilities` [N, classes] are softmax outputs."""

    def __init__(self, version: ModelVersion) -> None:
        super().__init__(version)
        params = self.config.parameters
        try:
            self.labels: list[str] = [str(label) for label in params["labels"]]
            size = params["input"]
            limits = params["limits"]
            self.limits = ImageLimits(
                height=int(size["height"]), width=int(size["width"]),
                max_image_bytes=int(limits["max_image_bytes"]), max_image_pixels=int(limits["max_image_pixels"]),
                pixel_min=float(size.get("pixel_min", 0.0)), pixel_max=float(size.get("pixel_max", 255.0)),
            )
            self.default_top_k = int(params.get("default_top_k", 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cnn v{self.version} config: parameters need 'labels', 'input' (height, width) "
                             f"and 'limits' (max_image_bytes, max_image_pixels): {exc}") from None
        expected = [-1, 1, self.limits.height, self.limits.width]
        if [s.name for s in self.inputs] != [INPUT] or list(self.inputs[0].shape) != expected:
            raise ValueError(f"cnn v{self.version} config: input must be {INPUT!r} {expected}")
        out = {s.name: s for s in self.outputs}
        if PROBABILITIES not in out or list(out[PROBABILITIES].shape) != [-1, len(self.labels)]:
            raise ValueError(f"cnn v{self.version} config: output {PROBABILITIES!r} must be [-1, {len(self.labels)}]")
        if not 1 <= self.default_top_k <= len(self.labels):
            raise ValueError(f"cnn v{self.version} config: default_top_k must be in 1..{len(self.labels)}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def validate_rows(self, inputs: Mapping[str, np.ndarray]) -> list[str | None]:
        """Each image's pixels must be finite and within the configured range (OIP requests too)."""
        x = inputs[INPUT]
        flat = x.reshape(x.shape[0], -1)
        ok = np.isfinite(flat).all(axis=1) & ((flat >= self.limits.pixel_min) & (flat <= self.limits.pixel_max)).all(
            axis=1)
        return [None if good else f"{INPUT}: {pixel_problem(x[i, 0], self.limits)}" for i, good in enumerate(ok)]

    def warmup_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        """A bright square on black in each image: valid pixels that exercise every layer."""
        x = np.zeros((batch_size, 1, self.limits.height, self.limits.width), dtype=np.float32)
        h, w = self.limits.height, self.limits.width
        x[:, :, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 255.0
        return {INPUT: x}
