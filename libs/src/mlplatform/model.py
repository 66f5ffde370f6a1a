"""The model contract: load -> warm-up -> batched infer -> unload, with tensor metadata.

Implementations over a runtime (`OnnxModel`, `RuntimeModel` whose config chooses
TorchScript or ONNX Runtime) live in `mlplatform.backends`. A service subclasses one
of them and adds what is specific to its model: per-row validation and an optional
fallback. Every transport reaches a model through `mlplatform.dataplane`.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from mlplatform import metrics, runtime_threads
from mlplatform.config import ModelConfig
from mlplatform.errors import InvalidInputError
from mlplatform.repository import ModelVersion
from mlplatform.tensors import TensorSpec, shape_matches, shape_str

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


class Model(ABC):
    """A loaded model version. `infer` is blocking and batched; callers run it off the event loop."""

    def __init__(self, version: ModelVersion) -> None:
        self.model_version = version
        self.config: ModelConfig = version.config
        self.name = self.config.name
        self.version = str(self.config.version)
        self.ready = False

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.config.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.config.outputs

    @property
    def max_batch_size(self) -> int:
        return self.config.batching.max_batch_size

    @property
    def device(self) -> str:
        """Where inference runs (`cpu` or `gpu`)."""
        return "cpu"

    @property
    def providers(self) -> list[str]:
        """Runtime providers in use (e.g. ONNX Runtime execution providers); empty when not applicable."""
        return []

    def batch_pad_sizes(self) -> list[int]:
        """Batch sizes to pad runtime calls to on this model's device (`batching.pad_to_preferred`); [] for none."""
        mode = self.config.batching.pad_to_preferred
        if mode == "always" or (mode == "gpu" and self.device == "gpu"):
            return self.config.batching.padded_sizes()
        return []

    @abstractmethod
    def _load(self) -> None:
        """Load the artifact (blocking)."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run one batch (blocking); outputs keep the batch dimension first."""

    variable_length: bool = False
    """True when rows are sequences of different lengths (the batcher then groups them by length)."""

    def sequence_lengths(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per-row sequence length (e.g. tokens) of a request; used when `variable_length`."""
        raise NotImplementedError(f"{type(self).__name__} has no variable-length inputs")

    def validate_rows(self, inputs: Mapping[str, np.ndarray]) -> list[str | None]:
        """Per-row problems (None for a good row); override for model-specific checks."""
        return [None] * next(iter(inputs.values())).shape[0]

    def fallback(self, inputs: Mapping[str, np.ndarray]) -> Tensors | None:
        """Outputs to answer with when the model fails or its breaker is open; None: no fallback."""
        return None

    def warmup_inputs(self, batch_size: int) -> Tensors:
        """Inputs for a warm-up batch: zeros of each input's shape. Override for realistic data."""
        out: Tensors = {}
        for spec in self.inputs:
            dims = [batch_size, *(d if d > 0 else 1 for d in spec.shape[1:])]
            out[spec.name] = np.zeros(dims, dtype=spec.numpy_dtype)
        return out

    async def load(self) -> None:
        """Load off the event loop."""
        await asyncio.get_running_loop().run_in_executor(runtime_threads.LOADER, self._load)
        self._info_labels = (self.name, self.version, self.config.platform, self.device, ",".join(self.providers))
        metrics.MODEL_INFO.labels(*self._info_labels).set(1)
        log.info("loaded %s v%s from %s on %s %s", self.name, self.version, self.model_version.artifact_path,
                 self.device, self.providers)

    async def warmup(self, iterations: int | None = None) -> None:
        """Run warm-up batches of each configured size (with batch padding: each padded size, the only shapes
        the runtime will see); the model is ready only when they succeed."""
        n = iterations or self.config.warmup.iterations
        sizes = self.batch_pad_sizes() or self.config.warmup.batch_sizes
        for batch_size in sizes:
            inputs = self.warmup_inputs(batch_size)
            for _ in range(n):
                outputs = await asyncio.get_running_loop().run_in_executor(runtime_threads.LOADER, self.infer, inputs)
                self.check_outputs(outputs, batch_size)
        self.ready = True
        metrics.MODEL_READY.labels(model=self.name, version=self.version).set(1)
        log.info("warmed up %s v%s: batch sizes %s x %d", self.name, self.version, sizes, n)

    async def unload(self) -> None:
        """Release the runtime (subclasses drop their session); the version's info series goes away."""
        self.ready = False
        metrics.MODEL_READY.labels(model=self.name, version=self.version).set(0)
        labels = self.__dict__.pop("_info_labels", None)
        if labels is not None:
            metrics.MODEL_INFO.remove(*labels)

    def check_outputs(self, outputs: Mapping[str, np.ndarray], rows: int) -> None:
        """Raise when the runtime's outputs do not match the declared ones."""
        for spec in self.outputs:
            if spec.name not in outputs:
                raise RuntimeError(f"model produced no output {spec.name!r}")
            actual = outputs[spec.name].shape
            if not shape_matches(actual, spec.shape) or actual[0] != rows:
                raise RuntimeError(f"output {spec.name!r} has shape {actual}, expected {shape_str(spec.shape)}")

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Check names, dtypes and shapes against the metadata; return the row count (the data plane checks
        it against the batch limit)."""
        expected = {s.name for s in self.inputs}
        missing = expected - inputs.keys()
        extra = inputs.keys() - expected
        if missing:
            raise InvalidInputError(f"missing input tensor(s) {sorted(missing)}; expected {sorted(expected)}")
        if extra:
            raise InvalidInputError(f"unknown input tensor(s) {sorted(extra)}; expected {sorted(expected)}")
        rows = None
        for spec in self.inputs:
            arr = inputs[spec.name]
            if arr.dtype != spec.numpy_dtype:
                raise InvalidInputError(f"input {spec.name!r}: datatype must be {spec.datatype}")
            if not shape_matches(arr.shape, spec.shape):
                raise InvalidInputError(
                    f"input {spec.name!r}: shape {list(arr.shape)} does not match {shape_str(spec.shape)}"
                )
            if rows is not None and arr.shape[0] != rows:
                raise InvalidInputError(f"input {spec.name!r}: batch size {arr.shape[0]} differs from {rows}")
            rows = arr.shape[0]
        assert rows is not None
        return rows
