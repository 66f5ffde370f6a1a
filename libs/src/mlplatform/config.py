"""The schema of one model version's `config.json` (Triton-style knobs), and its parser.

Where the file lives and which version is served is `mlplatform.repository`'s concern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    latency_budget_ms: float | None = Field(None, gt=0)
    """The model's latency budget (its SLO). A request whose estimated queue wait plus inference exceeds
    the sooner of this and the client's deadline is refused at once (RESOURCE_EXHAUSTED, with a retry
    hint); one that has waited longer than this is refused before inference (Triton's queue policy,
    `timeout_action: REJECT`). None: only the client's deadline (and `max_queue_size`) bound the queue."""
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Batch sizes the runtime is fastest at (reported in ModelConfig, used for warm-up)."""
    max_concurrent_batches: int = Field(1, ge=1)
    """Batches in the runtime at once (more overlaps Python work with inference)."""
    inline_below_ms: float = Field(0.5, ge=0)
    """A batch whose estimated run time is under this runs on the event loop instead of a worker thread
    (the hop to a thread and back costs ~0.2 ms of CPU, more than a small tabular model's call); 0: never."""
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


class LatestVersions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_versions: int = Field(1, ge=1)


class SpecificVersions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    versions: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> Self:
        if any(v < 1 for v in self.versions):
            raise ValueError(f"versions must be positive integers, got {self.versions}")
        return self


class VersionPolicy(BaseModel):
    """Which versions of a model are served, as Triton's `version_policy`: exactly one of
    `{"latest": {"num_versions": N}}` (the default, N=1), `{"all": {}}` or
    `{"specific": {"versions": [1, 3]}}`."""

    model_config = ConfigDict(extra="forbid")

    latest: LatestVersions | None = None
    all: dict[str, Any] | None = None
    specific: SpecificVersions | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"version_policy: give one of latest, all, specific, not {kinds}")
        if self.all:
            raise ValueError("version_policy.all takes no fields: {}")
        if not kinds:
            self.latest = LatestVersions()
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of `available` (ascending); a `specific` version that is not there
        is left out (the caller reports it)."""
        ordered = sorted(available)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            wanted = set(self.specific.versions)
            return [v for v in ordered if v in wanted]
        assert self.latest is not None
        return ordered[-self.latest.num_versions:]

    def describe(self) -> str:
        """One line for logs and errors, e.g. `latest 2`, `all`, `specific [1, 3]`."""
        if self.all is not None:
            return "all"
        if self.specific is not None:
            return f"specific {sorted(self.specific.versions)}"
        assert self.latest is not None
        return f"latest {self.latest.num_versions}"

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """A policy from a setting: `latest:2`, `all`, `specific:1,3`, or Triton's JSON object."""
        text = text.strip()
        try:
            if text.startswith("{"):
                return cls.model_validate(json.loads(text))
            kind, _, arg = text.partition(":")
            if kind == "all" and not arg:
                return cls(all={})
            if kind == "latest":
                return cls(latest=LatestVersions(num_versions=int(arg or 1)))
            if kind == "specific" and arg:
                return cls(specific=SpecificVersions(versions=[int(v) for v in arg.split(",")]))
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"invalid version policy {text!r}: {exc}") from None
        raise ValueError(f"invalid version policy {text!r}: expected latest[:N], all, specific:V[,V...] "
                         "or a JSON object")


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
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    """Which versions are served; the newest version's config decides for the model (Triton's
    `version_policy`, default: the latest one)."""

    @model_validator(mode="after")
    def _batch_dims(self) -> Self:
        for spec in [*self.inputs, *self.outputs]:
            if not spec.shape or spec.shape[0] != -1:
                raise ValueError(f"tensor {spec.name!r}: the first dimension must be the batch (-1)")
        too_big = [b for b in [*self.batching.preferred_batch_sizes, *self.warmup.batch_sizes]
                   if b > self.batching.max_batch_size or b < 1]
        if too_big:
            raise ValueError(f"batch sizes {too_big} are outside 1..max_batch_size={self.batching.max_batch_size}")
        budget = self.batching.latency_budget_ms
        if budget is not None and budget <= self.batching.max_queue_delay_ms:
            raise ValueError(f"batching.latency_budget_ms ({budget:g}) must exceed batching.max_queue_delay_ms "
                             f"({self.batching.max_queue_delay_ms:g}): a batch may wait that long to fill")
        return self


def load_config(path: Path) -> ModelConfig:
    """Parse and validate a config file; the error names the file and field."""
    try:
        return ModelConfig.model_validate(json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"{path}: invalid model config: {exc}") from None
