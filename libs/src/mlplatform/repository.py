"""The model repository on disk and each version's config file.

Layout: `<root>/<model>/<version>/config.json` plus the artifact it names
(e.g. `model.onnx`). Versions are positive integers; the newest is served unless
a version is pinned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlplatform.errors import NotFoundError
from mlplatform.tensors import TensorSpec

CONFIG_FILE = "config.json"


class BatchingConfig(BaseModel):
    """Dynamic batching knobs (named after Triton's where they mean the same)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1)
    """Most rows in one inference call; also the most rows one request may carry."""
    max_queue_delay_ms: float = Field(5.0, ge=0)
    """How long the first request of a batch may wait for others to join it."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests waiting at most; beyond it new ones get RESOURCE_EXHAUSTED."""
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Batch sizes the runtime is fastest at (reported in ModelConfig, used for warm-up)."""
    max_concurrent_batches: int = Field(1, ge=1)
    """Batches in the runtime at once (more overlaps Python work with inference)."""
    length_group_overhead: int = Field(256, ge=0)
    """Variable-length models: padded positions one more runtime call is worth; a closed batch is
    cut into length groups where that saves more padding (0: always one group per length)."""
    pad_to_preferred: Literal["never", "gpu", "always"] = "never"
    """Pad each batch with copies of its last row up to the smallest of `preferred_batch_sizes` (and
    `max_batch_size`) that holds it, like TF Serving's `allowed_batch_sizes`, so the runtime only ever
    sees those shapes, all warmed up. `gpu`: only when the model runs on a GPU, where CUDA/cuDNN set
    up each new shape on its first call (tens of ms) and extra rows cost almost nothing."""

    def padded_sizes(self) -> list[int]:
        """The batch sizes batches are padded to (ascending), ending with max_batch_size."""
        return sorted({*self.preferred_batch_sizes, self.max_batch_size})


class RuntimeConfig(BaseModel):
    """Runtime options."""

    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int = Field(1, ge=0)
    """Threads inside one operator (0: the runtime's default)."""
    inter_op_threads: int = Field(1, ge=0)
    """Threads across operators (0: the runtime's default)."""
    providers: list[str] | None = None
    """ONNX Runtime execution providers in preference order; default TensorRT, CUDA, CPU."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Runtime-specific options (e.g. TensorRT FP16, engine cache directory)."""


class WarmupConfig(BaseModel):
    """Warm-up inferences run after load and before the service reports SERVING."""

    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    iterations: int = Field(1, ge=1)


class ModelConfig(BaseModel):
    """One model version's `config.json`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    platform: str
    """Triton-style platform name, e.g. `onnxruntime_onnx`."""
    artifact: str
    """File of the model, relative to the version directory."""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Model-specific settings (threshold, feature ranges, labels, build metrics)."""

    @model_validator(mode="after")
    def _batch_dims(self) -> Self:
        for spec in [*self.inputs, *self.outputs]:
            if not spec.shape or spec.shape[0] != -1:
                raise ValueError(f"tensor {spec.name!r}: the first dimension must be the batch (-1)")
        too_big = [b for b in [*self.batching.preferred_batch_sizes, *self.warmup.batch_sizes]
                   if b > self.batching.max_batch_size or b < 1]
        if too_big:
            raise ValueError(f"batch sizes {too_big} are outside 1..max_batch_size={self.batching.max_batch_size}")
        return self


@dataclass(frozen=True)
class ModelVersion:
    """A resolved model version: its directory and parsed config."""

    path: Path
    config: ModelConfig

    @property
    def artifact_path(self) -> Path:
        return self.path / self.config.artifact


class ModelRepository:
    """Reads `<root>/<model>/<version>/` directories."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self, model: str) -> list[int]:
        """Versions of `model` that have a config file, ascending."""
        model_dir = self.root / model
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / CONFIG_FILE).is_file()
        )

    def resolve(self, model: str, version: int | None = None) -> ModelVersion:
        """The pinned `version`, or the newest one; raise NotFoundError or ValueError (bad config)."""
        available = self.versions(model)
        if not available:
            models = sorted(p.name for p in self.root.iterdir() if self.versions(p.name)) if self.root.is_dir() else []
            raise NotFoundError(f"model {model!r} has no versions under {self.root}; available models: {models} "
                                "(run `make models`)")
        chosen = version if version is not None else available[-1]
        if chosen not in available:
            raise NotFoundError(f"model {model!r} has no version {chosen}; available: {available}")
        path = self.root / model / str(chosen)
        config = load_config(path / CONFIG_FILE)
        if config.name != model or config.version != chosen:
            raise ValueError(f"{path / CONFIG_FILE}: says {config.name!r} v{config.version}, "
                             f"but lives at {model}/{chosen}")
        if not (path / config.artifact).is_file():
            raise ValueError(f"{path / CONFIG_FILE}: artifact {config.artifact!r} is missing")
        return ModelVersion(path=path, config=config)


def load_config(path: Path) -> ModelConfig:
    """Parse and validate a config file; the error names the file and field."""
    try:
        return ModelConfig.model_validate(json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"{path}: invalid model config: {exc}") from None
