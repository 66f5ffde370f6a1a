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
