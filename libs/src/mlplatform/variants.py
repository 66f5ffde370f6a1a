"""Choosing a model's runtime variant from the hardware present and the build's measurements.

A config with several runtime variants (`runtime.options.variants`) may set
`runtime.options.variant` to `"auto"`. Each variant then says where it is a candidate,
`"target": "gpu" | "cpu"` (default `cpu`), and what its build measured on held-out data,
`"measured": {"accuracy": 0.93, "rows_per_s": {"1": 250.0, "8": 610.0, "32": 700.0}}`.
`runtime.options.auto` holds the rule:
`{"reference": "onnx", "max_accuracy_drop": 0.01, "require_batch_invariant": true}`: the FP32
variant accuracy is compared with, how far below it a candidate may be (0.01 = 1 point), and
whether a candidate must give a row the same answer whatever it is batched with
(`measured.batch_invariant`; dynamic INT8 quantises each batch with its own range, so a row's
answer moves with its batch-mates, and a per-row prediction cache would keep whichever came first).

At load, `choose_variant`:
- with a GPU (`gpu_available()`) and a `gpu` candidate: the fastest measured `gpu`
  candidate, else the first one listed (a build without a GPU cannot measure it);
- otherwise, among the `cpu` candidates whose measured accuracy is within
  `max_accuracy_drop` of the reference's (and batch-invariant when required): the fastest
  (geometric mean of its rows/s over the measured batch sizes). A candidate without a measured accuracy never qualifies.
The answer carries a one-line reason, which the model logs and reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
TARGETS = ("gpu", "cpu")
DEFAULT_MAX_ACCURACY_DROP = 0.01
_EPS = 1e-9  # accuracies are fractions of a finite set: compare with a little slack for rounding


@dataclass(frozen=True)
class VariantChoice:
    """The variant to serve, why, and how it was chosen (`auto`, `config` or `override`)."""

    name: str
    reason: str
    selection: str

    def as_parameters(self) -> dict[str, str]:
        """The choice as model config parameters (what OIP `ModelConfig.parameters` shows)."""
        return dict(zip(PARAMETER_KEYS, (self.name, self.reason, self.selection), strict=True))


PARAMETER_KEYS = ("runtime_variant", "runtime_variant_reason", "runtime_variant_selection")
"""The config parameters that say which runtime variant is served, why, and how it was chosen."""


def gpu_available() -> bool:
    """True when a CUDA GPU can run models: `torch.cuda.is_available()` where torch is installed, else
    ONNX Runtime's CUDA provider (which onnxruntime-gpu lists even without a device: a best effort)."""
    try:
        import torch
    except ImportError:
        try:
            import onnxruntime as ort
        except ImportError:
            return False
        return "CUDAExecutionProvider" in ort.get_available_providers()
    return bool(torch.cuda.is_available())


def speed_score(measured: Mapping[str, Any] | None) -> float:
    """Geometric mean of a variant's measured rows/s over its batch sizes; 0 when unmeasured."""
    rates = [float(r) for r in ((measured or {}).get("rows_per_s") or {}).values() if r and float(r) > 0]
    if not rates:
        return 0.0
    return math.exp(sum(math.log(r) for r in rates) / len(rates))


def qualifying(variants: Mapping[str, Mapping[str, Any]], rule: Mapping[str, Any],
               target: str = "cpu") -> list[str]:
    """Variants of `target` whose measured accuracy is within the rule's drop of the reference's (and, when the
    rule requires it, measured batch-invariant), fastest first (ties keep the config's order)."""
    reference = rule.get("reference")
    if reference not in variants:
        raise ValueError(f"runtime.options.auto.reference {reference!r} is not one of {sorted(variants)}")
    ref_accuracy = (variants[reference].get("measured") or {}).get("accuracy")
    if ref_accuracy is None:
        raise ValueError(f"runtime variant {reference!r} (the auto reference) has no measured accuracy")
    floor = float(ref_accuracy) - float(rule.get("max_accuracy_drop", DEFAULT_MAX_ACCURACY_DROP))
    invariant = bool(rule.get("require_batch_invariant", False))
    names = [n for n, v in variants.items() if v.get("target", "cpu") == target
             and (v.get("measured") or {}).get("accuracy") is not None
             and float(v["measured"]["accuracy"]) >= floor - _EPS
             and (not invariant or v["measured"].get("batch_invariant") is True)]
    return sorted(names, key=lambda n: -speed_score(variants[n].get("measured")))


def _rates(measured: Mapping[str, Any] | None) -> str:
    rates = (measured or {}).get("rows_per_s") or {}
    return "/".join(f"{float(r):.0f}" for r in rates.values()) + f" rows/s at batch {'/'.join(rates)}"


def choose_variant(variants: Mapping[str, Mapping[str, Any]], rule: Mapping[str, Any] | None,
                   gpu: bool) -> VariantChoice:
    """The variant `auto` serves on this hardware (`gpu`: a CUDA GPU is present); see the module docstring."""
    rule = dict(rule or {})
    for name, v in variants.items():
        if v.get("target", "cpu") not in TARGETS:
            raise ValueError(f"runtime variant {name!r}: target must be one of {TARGETS}")
    gpu_names = [n for n, v in variants.items() if v.get("target") == "gpu"]
    if gpu and gpu_names:
        best = max(gpu_names, key=lambda n: speed_score(variants[n].get("measured")))
        return VariantChoice(best, f"GPU present: {best} is the GPU variant", AUTO)
    ranked = qualifying(variants, rule)
    if not ranked:
        raise ValueError("runtime variant auto: no cpu variant has a measured accuracy within "
                         f"{rule.get('max_accuracy_drop', DEFAULT_MAX_ACCURACY_DROP)} of the reference"
                         + (" and is batch-invariant" if rule.get("require_batch_invariant") else ""))
    best = ranked[0]
    measured = variants[best]["measured"]
    ref = rule["reference"]
    drop = float(rule.get("max_accuracy_drop", DEFAULT_MAX_ACCURACY_DROP))
    where = "no GPU" if not gpu else "GPU present but no gpu variant"
    invariant = "batch-invariant " if rule.get("require_batch_invariant") else ""
    reason = (f"{where}: {best} is the fastest {invariant}CPU variant within {drop * 100:g} point(s) of {ref}'s "
              f"held-out accuracy ({float(measured['accuracy']):.4f} vs "
              f"{float(variants[ref]['measured']['accuracy']):.4f}; {_rates(measured)})")
    return VariantChoice(best, reason, AUTO)
