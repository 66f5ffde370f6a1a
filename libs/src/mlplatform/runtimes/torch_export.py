"""torch.export backend: an ExportedProgram (`.pt2`, `torch.export.save`) or an AOTInductor package, on the CPU.

TorchScript is deprecated in torch 2.13; `torch.export` is its successor. An ExportedProgram
runs as `torch.export.load(path).module()` (the exported graph in eager PyTorch); an
AOTInductor package (`aoti_compile_and_package`, native code compiled for this machine's CPU
and torch build) runs through `torch._inductor.aoti_load_package`. Inputs come in
`input_names` order; outputs go back as numpy by `output_names`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("exported_program", "aoti")


class ExportedProgramSession:
    """A `torch.export` artefact run without autograd on the CPU (FP32)."""

    def __init__(self, path: Path, *, input_names: Sequence[str], output_names: Sequence[str],
                 intra_op_threads: int = 1, kind: str = "exported_program") -> None:
        import torch

        if kind not in KINDS:
            raise ValueError(f"runtime.options.kind must be one of {KINDS}, got {kind!r}")
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        self._torch = torch
        if kind == "aoti":
            self.module = torch._inductor.aoti_load_package(str(path))
        else:
            self.module = torch.export.load(str(path)).module()
        self.kind = kind
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        log.info("torch.export %s (%s) on cpu, %d intra-op threads", Path(path).name, kind, torch.get_num_threads())

    device = "cpu"
    precision = "fp32"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the program (blocking) with inputs in `input_names` order; outputs by name."""
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(self.output_names):
            raise RuntimeError(f"model returned {len(results)} outputs, config names {self.output_names}")
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, results, strict=True)}
