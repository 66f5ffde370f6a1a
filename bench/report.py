"""What every benchmark report holds: latency percentiles and the machine they ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in milliseconds of latencies given in seconds, and their count."""
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    """CPU count and model, Python version."""
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version()}
