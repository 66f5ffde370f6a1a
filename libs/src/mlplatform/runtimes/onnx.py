"""ONNX Runtime backend with execution-provider selection.

Preference order TensorRT -> CUDA -> CPU, filtered by what the installed
onnxruntime offers. `onnxruntime-gpu` lists TensorRT and CUDA even on a machine
without a GPU and then silently falls back to CPU, so the providers reported are
the ones the session actually got (`get_providers()`), not the ones asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PREFERENCE = (TENSORRT, CUDA, CPU)

ProviderList = list[tuple[str, dict[str, Any]]]


def select_providers(
    available: Sequence[str],
    preferred: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ProviderList:
    """Providers to ask for, in order, with their options: the preferred ones that are available.

    CPU is always appended last as the fallback. `options` maps a provider name to
    its provider options (e.g. TensorRT's `trt_fp16_enable`).
    """
    preferred = list(preferred or DEFAULT_PREFERENCE)
    unknown = [p for p in preferred if not p.endswith("ExecutionProvider")]
    if unknown:
        raise ValueError(f"runtime.providers: {unknown} are not ONNX Runtime execution provider names")
    # CPU goes last even when listed earlier: ONNX Runtime gives each node to the first provider
    # that supports it, and CPU supports them all, so nothing after it would ever be used.
    chosen = [p for p in dict.fromkeys(preferred) if p in available and p != CPU]
    chosen.append(CPU)
    options = options or {}
    return [(p, dict(options.get(p, {}))) for p in chosen]


# TensorRT options that name a directory: a relative one is resolved against the model version directory.
TENSORRT_PATH_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")
TENSORRT_PROFILE_OPTIONS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def tensorrt_profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int]]], *, min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, str]:
    """TensorRT optimisation-profile options for inputs whose only dynamic dimension is the batch.

    `inputs` are (name, shape) with -1 for the batch dimension, e.g. ("image", [-1, 1, 28, 28]) with
    batches 1/16/32 gives `trt_profile_min_shapes="image:1x1x28x28"`, opt `16x...`, max `32x...`.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"TensorRT profile needs 1 <= min <= opt <= max batch, "
                         f"got {min_batch}/{opt_batch}/{max_batch}")

    def shapes(batch: int) -> str:
        parts = []
        for name, shape in inputs:
            if not shape or shape[0] != -1 or any(d < 1 for d in shape[1:]):
                raise ValueError(f"input {name!r} shape {list(shape)}: a TensorRT profile can only be derived "
                                 "when the batch is the only dynamic dimension; set trt_profile_*_shapes")
            parts.append(f"{name}:" + "x".join(str(d) for d in [batch, *shape[1:]]))
        return ",".join(parts)

    return dict(zip(TENSORRT_PROFILE_OPTIONS, (shapes(min_batch), shapes(opt_batch), shapes(max_batch)),
                    strict=True))


def resolve_provider_options(
    options: Mapping[str, Mapping[str, Any]] | None,
    *,
    model_dir: Path,
    inputs: Sequence[tuple[str, Sequence[int]]] = (),
    max_batch_size: int = 1,
    opt_batch_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """A model config's provider options made concrete for one version directory.

    TensorRT: relative cache paths (`trt_engine_cache_path`, `trt_timing_cache_path`) become
    `model_dir/<path>`, and unless the config sets `trt_profile_*_shapes` itself, an optimisation
    profile for batch 1 / `opt_batch_size` (default: max) / `max_batch_size` is derived from `inputs`.
    Other providers' options are copied unchanged.
    """
    out = {name: dict(opts) for name, opts in (options or {}).items()}
    trt = out.get(TENSORRT)
    if trt is None:
        return out
    for key in TENSORRT_PATH_OPTIONS:
        if key in trt and not Path(str(trt[key])).is_absolute():
            trt[key] = str(Path(model_dir) / str(trt[key]))
    if inputs and not any(k in trt for k in TENSORRT_PROFILE_OPTIONS):
        trt.update(tensorrt_profile_shapes(inputs, min_batch=1, opt_batch=opt_batch_size or max_batch_size,
                                           max_batch=max_batch_size))
    return out


class OnnxRuntimeSession:
    """An ONNX Runtime InferenceSession with thread settings and provider selection."""

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = select_providers(ort.get_available_providers(), providers, provider_options)
        for name, opts in requested:  # TensorRT writes its caches there; it must exist
            if name == TENSORRT:
                for key in TENSORRT_PATH_OPTIONS:
                    if key in opts:
                        Path(str(opts[key])).mkdir(parents=True, exist_ok=True)
        self.session = ort.InferenceSession(
            str(path),
            sess_options=so,
            providers=[name for name, _ in requested],
            provider_options=[opts for _, opts in requested],
        )
        self.requested_providers = [name for name, _ in requested]
        self.providers: list[str] = list(self.session.get_providers())
        if self.providers[0] != self.requested_providers[0]:
            log.warning("asked for %s, ONNX Runtime gave %s", self.requested_providers, self.providers)
        log.info("onnxruntime session for %s on providers %s", Path(path).name, self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def device(self) -> str:
        """`gpu` when the first active provider is TensorRT or CUDA, else `cpu`."""
        return "gpu" if self.providers[0] in (TENSORRT, CUDA) else "cpu"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model (blocking) and return every output by name."""
        results = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, results, strict=True))
