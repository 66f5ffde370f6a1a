"""TorchScript backend: FP16 on CUDA when a GPU exists (and the config allows it), FP32 on CPU.

`select_device` is the pure decision (tested without a GPU by passing `cuda_available`);
`TorchScriptSession` loads a `torch.jit` artifact onto that device, sets the thread
counts, and runs it under `torch.inference_mode` on numpy arrays. Integer inputs (token
ids, masks) keep their dtype; floating inputs are cast to the session's dtype; every
output comes back as float32 (or its own integer/bool dtype) numpy on the CPU.

Variable shapes (every batch padded to its own longest sequence) need the JIT not to
specialise on shapes: with its default fusion strategy (profile, then fuse for static and
later dynamic shapes) each new (batch, length) pair could re-profile and recompile, and a
traced MiniLM took 2-10x longer over 40 calls of random shapes here (1.5-5x at the median),
with single calls up to ~1 s. The default here is no shape-specialised fusion
([["STATIC", 0], ["DYNAMIC", 0]]); `runtime.options.fusion_strategy` overrides it
(process-wide, `torch.jit.set_fusion_strategy`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_FUSION_STRATEGY = (("STATIC", 0), ("DYNAMIC", 0))
PRECISIONS = ("auto", "fp32", "fp16")


@dataclass(frozen=True)
class DeviceChoice:
    """Where and in which precision a TorchScript model runs."""

    device: str  # "cpu" | "cuda"
    dtype: str  # "fp32" | "fp16"

    @property
    def kind(self) -> str:
        """`gpu` or `cpu`, as models report their device."""
        return "gpu" if self.device == "cuda" else "cpu"


def select_device(cuda_available: bool, device: str = "auto", precision: str = "auto") -> DeviceChoice:
    """Device and precision: CUDA + FP16 when a GPU is there (unless configured otherwise), else CPU + FP32.

    `device` is "auto", "cpu" or "cuda" (runtime.options.device); `precision` "auto", "fp32" or "fp16"
    (runtime.options.precision). Asking for CUDA without a GPU, or FP16 on the CPU, is a config error.
    """
    if device not in DEVICES:
        raise ValueError(f"runtime.options.device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.options.precision must be one of {PRECISIONS}, got {precision!r}")
    if device == "cuda" and not cuda_available:
        raise ValueError("runtime.options.device is 'cuda' but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and cuda_available)
    if not use_cuda:
        if precision == "fp16":
            raise ValueError("runtime.options.precision 'fp16' needs a CUDA device; the CPU runs fp32")
        return DeviceChoice("cpu", "fp32")
    return DeviceChoice("cuda", "fp32" if precision == "fp32" else "fp16")


class TorchScriptSession:
    """A `torch.jit` model on the selected device, run without autograd."""

    def __init__(
        self,
        path: Path,
        *,
        input_names: Sequence[str],
        output_names: Sequence[str],
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        import torch

        options = dict(options or {})
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        if inter_op_threads > 0:
            try:
                torch.set_num_interop_threads(inter_op_threads)
            except RuntimeError:  # only settable once per process, before any parallel work
                log.info("torch inter-op threads already set to %d", torch.get_num_interop_threads())
        strategy = [(str(kind), int(depth)) for kind, depth in
                    options.get("fusion_strategy", DEFAULT_FUSION_STRATEGY)]
        torch.jit.set_fusion_strategy(strategy)
        self.choice = select_device(torch.cuda.is_available(), options.get("device", "auto"),
                                    options.get("precision", "auto"))
        self._torch = torch
        self._device = torch.device(self.choice.device)
        self._dtype = torch.float16 if self.choice.dtype == "fp16" else torch.float32
        module = torch.jit.load(str(path), map_location=self._device)
        module.eval()
        if self._dtype == torch.float16:
            module = module.half()
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        log.info("torchscript %s on %s (%s), %d intra-op threads, fusion strategy %s", Path(path).name,
                 self.choice.device, self.choice.dtype, torch.get_num_threads(), strategy)

    @property
    def device(self) -> str:
        """`gpu` or `cpu`."""
        return self.choice.kind

    @property
    def precision(self) -> str:
        return self.choice.dtype

    def _tensor(self, value: np.ndarray) -> Any:
        t = self._torch.from_numpy(np.ascontiguousarray(value))
        if t.is_floating_point():
            t = t.to(self._dtype)
        return t.to(self._device, non_blocking=True)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model (blocking) with inputs in `input_names` order; outputs by name."""
        torch = self._torch
        args = [self._tensor(inputs[name]) for name in self.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(self.output_names):
            raise RuntimeError(f"model returned {len(results)} outputs, config names {self.output_names}")
        out: dict[str, np.ndarray] = {}
        for name, t in zip(self.output_names, results, strict=True):
            if t.is_floating_point():
                t = t.float()
            out[name] = t.cpu().numpy()
        return out
