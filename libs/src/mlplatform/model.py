"""The model abstraction: load -> warm-up -> batched predict -> unload, with tensor metadata.

A service subclasses `Model` (or `OnnxModel`, or `RuntimeModel` whose config
chooses TorchScript or ONNX Runtime) and adds what is specific to its
model: per-row validation and an optional fallback. Both the typed API and the
Open Inference Protocol servicer use `metadata` and the same predict path.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform import metrics
from mlplatform.errors import InvalidInputError
from mlplatform.repository import ModelConfig, ModelVersion
from mlplatform.runtimes.onnx import OnnxRuntimeSession, resolve_provider_options
from mlplatform.runtimes.torchscript import TorchScriptSession
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
        await asyncio.to_thread(self._load)
        metrics.MODEL_INFO.labels(model=self.name, version=self.version, platform=self.config.platform,
                                  device=self.device, providers=",".join(self.providers)).set(1)
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
                outputs = await asyncio.to_thread(self.infer, inputs)
                self.check_outputs(outputs, batch_size)
        self.ready = True
        metrics.MODEL_READY.labels(model=self.name, version=self.version).set(1)
        log.info("warmed up %s v%s: batch sizes %s x %d", self.name, self.version, sizes, n)

    async def unload(self) -> None:
        """Release the runtime."""
        self.ready = False
        metrics.MODEL_READY.labels(model=self.name, version=self.version).set(0)

    def check_outputs(self, outputs: Mapping[str, np.ndarray], rows: int) -> None:
        """Raise when the runtime's outputs do not match the declared ones."""
        for spec in self.outputs:
            if spec.name not in outputs:
                raise RuntimeError(f"model produced no output {spec.name!r}")
            actual = outputs[spec.name].shape
            if not shape_matches(actual, spec.shape) or actual[0] != rows:
                raise RuntimeError(f"output {spec.name!r} has shape {actual}, expected {shape_str(spec.shape)}")

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Check names, dtypes and shapes against the metadata; return the row count."""
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
        if rows == 0:
            raise InvalidInputError("empty batch: at least one row is required")
        if rows > self.max_batch_size:
            raise InvalidInputError(f"batch of {rows} rows is over the limit of {self.max_batch_size}")
        return rows


def open_onnx_session(model: Model, path: Path, provider_options: Mapping[str, Mapping[str, Any]] | None,
                      inputs: list[str], outputs: list[str], declared_by: str) -> OnnxRuntimeSession:
    """An ONNX Runtime session with the model config's threads and providers; ValueError when the artifact's
    inputs differ from `inputs` or it lacks one of `outputs` (`declared_by` names where those come from)."""
    rt = model.config.runtime
    session = OnnxRuntimeSession(path, intra_op_threads=rt.intra_op_threads, inter_op_threads=rt.inter_op_threads,
                                 providers=rt.providers, provider_options=provider_options)
    if sorted(session.input_names) != sorted(inputs):
        raise ValueError(f"{model.name} v{model.version}: artifact inputs {session.input_names} "
                         f"differ from {declared_by} inputs {inputs}")
    missing = set(outputs) - set(session.output_names)
    if missing:
        raise ValueError(f"{model.name} v{model.version}: artifact lacks outputs {sorted(missing)}")
    return session


class OnnxModel(Model):
    """A model served by ONNX Runtime, configured from the version's config."""

    session: OnnxRuntimeSession

    def _load(self) -> None:
        self.session = open_onnx_session(self, self.model_version.artifact_path, self.provider_options(),
                                         [s.name for s in self.inputs], [s.name for s in self.outputs], "config")

    def provider_options(self) -> dict[str, dict]:
        """The config's `runtime.options.provider_options` resolved for this version (cache paths under its
        directory, TensorRT profile for batch 1 / `tensorrt_opt_batch_size` / max_batch_size)."""
        rt = self.config.runtime
        return resolve_provider_options(
            rt.options.get("provider_options"), model_dir=self.model_version.path,
            inputs=[(s.name, s.shape) for s in self.inputs], max_batch_size=self.max_batch_size,
            opt_batch_size=rt.options.get("tensorrt_opt_batch_size"),
        )

    @property
    def device(self) -> str:
        return self.session.device

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually got."""
        return self.session.providers

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self.session.run(inputs)

    async def unload(self) -> None:
        await super().unload()
        self.__dict__.pop("session", None)


BACKENDS = ("torchscript", "onnxruntime")
PLATFORM_BACKENDS = {"pytorch_libtorch": "torchscript", "onnxruntime_onnx": "onnxruntime"}


def runtime_variant(config: ModelConfig, name: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """(variant name, backend, variant options) the config selects, or `name` overrides.

    `runtime.options.variants` maps a variant name (e.g. "torchscript", "onnx", "onnx_int8") to
    {"backend": "torchscript" | "onnxruntime", "artifact": file, ...}; `runtime.options.variant`
    picks one. Without variants the backend follows the platform and the artifact is `artifact`.
    """
    opts = config.runtime.options
    variants: dict[str, dict[str, Any]] = opts.get("variants") or {}
    if not variants:
        backend = PLATFORM_BACKENDS.get(config.platform)
        if backend is None:
            raise ValueError(f"platform {config.platform!r} has no runtime; known: {sorted(PLATFORM_BACKENDS)}")
        if name not in (None, "", backend):
            raise ValueError(f"runtime variant {name!r} is not in the config (no runtime.options.variants)")
        return backend, backend, {"artifact": config.artifact}
    chosen = name or opts.get("variant") or next(iter(variants))
    if chosen not in variants:
        raise ValueError(f"runtime variant {chosen!r} is not one of {sorted(variants)}")
    variant = dict(variants[chosen])
    if variant.get("backend") not in BACKENDS:
        raise ValueError(f"runtime variant {chosen!r}: backend must be one of {BACKENDS}")
    variant.setdefault("artifact", config.artifact)
    return chosen, variant["backend"], variant


class RuntimeModel(Model):
    """A model run by the runtime its config chooses: TorchScript (FP16 on CUDA, FP32 on CPU) or ONNX Runtime.

    The runtime's tensors may differ from the served ones (e.g. text in, token ids to the
    runtime): a variant's `inputs` / `outputs` name the runtime's tensors, in call order for
    TorchScript; by default they are the config's.
    """

    session: OnnxRuntimeSession | TorchScriptSession

    def __init__(self, version: ModelVersion, runtime: str | None = None) -> None:
        super().__init__(version)
        self.runtime_name, self.backend, self.variant = runtime_variant(self.config, runtime)
        self.runtime_path = version.path / self.variant["artifact"]
        if not self.runtime_path.is_file():
            raise ValueError(f"{self.name} v{self.version}: runtime {self.runtime_name!r} artifact "
                             f"{self.variant['artifact']!r} is missing")
        self.runtime_inputs: list[str] = list(self.variant.get("inputs") or [s.name for s in self.inputs])
        self.runtime_outputs: list[str] = list(self.variant.get("outputs") or [s.name for s in self.outputs])

    def _load(self) -> None:
        rt = self.config.runtime
        options = {**rt.options, **self.variant}
        if self.backend == "torchscript":
            self.session = TorchScriptSession(
                self.runtime_path, input_names=self.runtime_inputs, output_names=self.runtime_outputs,
                intra_op_threads=rt.intra_op_threads, inter_op_threads=rt.inter_op_threads, options=options,
            )
            return
        self.session = open_onnx_session(self, self.runtime_path, options.get("provider_options"),
                                         self.runtime_inputs, self.runtime_outputs, "runtime")

    @property
    def device(self) -> str:
        return self.session.device

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime providers in use, or `torchscript:<device>:<precision>`."""
        if isinstance(self.session, TorchScriptSession):
            return [f"torchscript:{self.session.choice.device}:{self.session.precision}"]
        return self.session.providers

    def run_runtime(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run the runtime on its own tensors (blocking)."""
        return self.session.run(inputs)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self.run_runtime(inputs)

    async def unload(self) -> None:
        await super().unload()
        self.__dict__.pop("session", None)
