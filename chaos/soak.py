"""`make soak DURATION=30m`: the chaos platform under the steady mix at half its capacity for DURATION, with the
RSS, open file descriptors and TCP connections of every process sampled, and p99 per model over time; the verdict:
memory and descriptors flat after warm-up (within 5 %), no p99 drift.

The capacity is measured first by a short ramp of the same mix (rising rates, 10 s each, until a model's p99 breaks
its SLO or a request fails), unless `--rate` is given."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from bench import loadgen
from bench.loadgen import Phase
from bench.stack import SLO_P99_MS
from chaos.platform import Platform
from chaos.traffic import TIMEOUT_S, targets

FLAT_TOLERANCE = 0.05
"""Memory and descriptors: the last window's mean within 5 % of the first window's after warm-up."""
P99_DRIFT_TOLERANCE = 0.5
"""p99: the last window's within 50 % of the first's after warm-up (latency on a shared 2-core machine is noisy;
a leak-driven drift grows far beyond it)."""


def parse_duration(text: str) -> float:
    """`30m`, `90s`, `1h`, `600` (seconds) -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


@dataclass
class ProcessSampler:
    """Every `interval_s`: RSS (bytes, the process and its children), open fds and TCP connections of each
    process of `pids()` (role -> pid, re-read each time, so a restarted replica is followed)."""

    pids: Any
    interval_s: float = 10.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    extra: Any = None
    """Optional () -> dict sampled alongside (e.g. Redis's own figures), stored under `extra`."""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self.t0 = time.time()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.time() - self.t0, 1), "rss_mb": {}, "fds": {}, "tcp": {}, "pid": {}}
        for role, pid in self.pids().items():
            try:
                p = psutil.Process(pid)
                procs = [p, *p.children(recursive=True)]
                row["rss_mb"][role] = round(sum(q.memory_info().rss for q in procs) / 2**20, 2)
                row["fds"][role] = sum(q.num_fds() for q in procs)
                row["tcp"][role] = sum(len(q.net_connections(kind="tcp")) for q in procs)
                row["pid"][role] = pid
            except psutil.Error:
                continue
        if self.extra is not None:
            try:
                row["extra"] = self.extra()
            except Exception as exc:  # a sample without it, never a failed soak
                row["extra"] = {"error": f"{type(exc).__name__}: {exc}"}
        return row

    def _loop(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> ProcessSampler:
        self.t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def flatness(samples: list[dict[str, Any]], metric: str, warmup_s: float, window: float = 0.15
             ) -> dict[str, dict[str, Any]]:
    """Per role: mean of `metric` over the first and the last `window` share of the samples after `warmup_s`, the
    growth between them (last / first - 1) and whether it is within FLAT_TOLERANCE; a role whose pid changed
    after warm-up (restarted) is reported with `restarted: true` and not judged."""
    after = [s for s in samples if s["t"] >= warmup_s]
    out: dict[str, dict[str, Any]] = {}
    if len(after) < 2:
        return out
    k = max(1, int(len(after) * window))
    roles = set().union(*(s[metric].keys() for s in after))
    for role in sorted(roles):
        series = [s[metric][role] for s in after if role in s[metric]]
        pids = {s["pid"].get(role) for s in after if role in s["pid"]}
        if len(series) < 2:
            continue
        first, last = float(np.mean(series[:k])), float(np.mean(series[-k:]))
        growth = (last / first - 1) if first else (0.0 if last == first else float("inf"))
        # a handful of descriptors or connections is not a percentage question
        small = metric in ("fds", "tcp") and abs(last - first) <= 2
        out[role] = {"first": round(first, 2), "last": round(last, 2), "growth_pct": round(100 * growth, 2),
                     "max": max(series), "flat": bool(small or abs(growth) <= FLAT_TOLERANCE),
                     "restarted": len(pids) > 1}
    return out


def p99_over_time(res: loadgen.Result, window_s: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    """Per target: p99 (every request, ms), requests and failures of each `window_s` window of intended times."""
    out: dict[str, list[dict[str, Any]]] = {}
    for target in res.targets:
        rows = []
        t = 0.0
        while t < res.duration_s - 1e-9:
            s = res.summary(target, window=(t, min(t + window_s, res.duration_s)))
            rows.append({"t": t, "requests": s["requests"], "p99_ms": s["p99_ms"], "p50_ms": s["p50_ms"],
                         "failed": s["error_count"]})
            t += window_s
        out[target] = rows
    return out


def drift(series: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The p99 of the first and last window after warm-up, their ratio, and whether it is within tolerance."""
    after = [w for w in series if w["t"] >= warmup_s and w["p99_ms"] is not None and w["requests"]]
    if len(after) < 2:
        return {"flat": None}
    first, last = after[0]["p99_ms"], after[-1]["p99_ms"]
    ratio = last / first if first else None
    return {"first_ms": round(first, 1), "last_ms": round(last, 1), "ratio": round(ratio, 2) if ratio else None,
            "max_ms": round(max(w["p99_ms"] for w in after), 1),
            "flat": ratio is not None and ratio <= 1 + P99_DRIFT_TOLERANCE}


def capacity(platform: Platform, rates: list[float], step_s: float = 10.0) -> tuple[float, list[dict[str, Any]]]:
    """The highest rate of the mix (req/s) whose every model keeps its p99 SLO with no failed request (rising
    `rates`, stopping at the first that breaks); the steps."""
    gw = f"127.0.0.1:{platform.gateway_port}"
    best, steps = 0.0, []
    for rate in rates:
        res = loadgen.run(targets(gw, rate, step_s, f"soak-ramp{int(rate)}"), [Phase(step_s, rate)],
                          processes=loadgen.worker_processes(rate), timeout_s=TIMEOUT_S)
        step: dict[str, Any] = {"rate": rate, "targets": {}}
        broken = []
        for target in res.targets:
            s = res.summary(target)
            model = target.split("/")[0]
            step["targets"][target] = {"p99_ms": s["p99_ms"], "failed": s["error_count"]}
            if s["error_count"] or (s["p99_ms"] or 0) > SLO_P99_MS.get(model, 200.0):
                broken.append(target)
        step["broken"] = broken
        steps.append(step)
        print(f"soak ramp {rate:g} req/s: " + ", ".join(f"{t} p99 {v['p99_ms']:.0f} ms fail {v['failed']}"
                                                      for t, v in step["targets"].items()), flush=True)
        if broken:
            break
        best = rate
        time.sleep(3)
    return best, steps


def redis_figures(platform: Platform) -> dict[str, Any]:
    """Redis's own view: keys, audit stream length, used memory (bytes), connected clients."""
    info = dict(line.split(":", 1) for line in platform.redis_cli("INFO").splitlines() if ":" in line)
    return {"keys": int(platform.redis_cli("DBSIZE") or 0),
            "audit_len": int(platform.redis_cli("XLEN", "fraud:audit") or 0),
            "used_memory": int(info.get("used_memory", "0").strip() or 0),
            "connected_clients": int(info.get("connected_clients", "0").strip() or 0)}
