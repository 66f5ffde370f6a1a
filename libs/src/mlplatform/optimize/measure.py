"""Measure a format the same way for every format: size, held-out accuracy, agreement with the FP32 reference,
p50 / p99 latency at batch 1 on one thread (the edge profile) and rows/s at batch 8 and 32.

Latency: every held-out row of the latency set alone, one thread, after a warm-up; p50 / p99 over
the rows of each row's best time in `rounds` passes. The same single-row answers, compared with
the batched ones, say whether a row's answer depends on its batch-mates (`batch_invariant`).
Throughput: the held-out rows in batches of 8 and 32 with the toolkit's thread count; rows/s is
rows over the sum of each batch's best time in `rounds` passes. On a shared machine a neighbour's
burst slows whatever runs at that moment, so the formats take turns within each pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlplatform.optimize.formats import Runner
from mlplatform.optimize.subject import Feeds, Subject

BATCH_INVARIANCE_TOLERANCE = 1e-4
THROUGHPUT_BATCHES = (8, 32)


@dataclass(frozen=True)
class Plan:
    """Which held-out rows each measurement uses, and how hard it works."""

    eval_rows: int
    latency_rows: int
    throughput_rows: int
    rounds: int
    threads: int


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def predict(run: Runner, batches: Sequence[Feeds]) -> np.ndarray:
    return np.concatenate([np.asarray(run(f), dtype=np.float32) for f in batches])


class Bench:
    """Held-out feeds prepared once (tokenised, batched), and the FP32 reference's probabilities."""

    def __init__(self, subject: Subject, plan: Plan) -> None:
        self.subject = subject
        self.plan = plan
        n = min(plan.eval_rows, len(subject.labels))
        self.labels = subject.labels[:n]
        self.eval_batches = [subject.heldout(idx) for idx in chunks(n, subject.batch_size)]
        self.singles = [subject.heldout([i]) for i in range(min(plan.latency_rows, n))]
        m = min(plan.throughput_rows, n)
        self.batched = {b: [subject.heldout(idx) for idx in chunks(m - m % b or m, b)] for b in THROUGHPUT_BATCHES}
        self.reference: np.ndarray | None = None

    def accuracy(self, run: Runner) -> float:
        """Held-out accuracy of a runner (6 decimals)."""
        return round(float((predict(run, self.eval_batches).argmax(1) == self.labels).mean()), 6)

    def max_diff(self, run: Runner) -> float:
        """Max |p - p_reference| over the held-out rows."""
        assert self.reference is not None
        return float(np.abs(predict(run, self.eval_batches) - self.reference).max())

    def measure_all(self, makers: dict[str, Any],
                    failed: Callable[[str, Exception], None] | None = None) -> dict[str, dict[str, Any]]:
        """The figures of every format (`makers`: name -> `make(threads)` -> runner), timed in turns.

        Accuracy and agreement first, format by format. Then the timings interleave: round after
        round, every format runs the latency set (one thread, one row per call) and the throughput
        batches, and each call keeps its best time over the rounds, so a neighbour's burst on a
        shared machine does not land on one format only. `failed(name, exc)` hears of a format that
        cannot run; it is left out of the result.
        """
        plan = self.plan
        out: dict[str, dict[str, Any]] = {}
        runs: dict[str, tuple[Runner, Runner]] = {}
        batched: dict[str, np.ndarray] = {}
        for name, make in makers.items():
            try:
                run, one = make(plan.threads), make(1)
                probs = predict(run, self.eval_batches)
                for f in self.singles[:3]:
                    one(f)
                for batches in self.batched.values():
                    run(batches[0])
            except Exception as exc:
                if failed is None:
                    raise
                failed(name, exc)
                continue
            if self.reference is None:
                self.reference = probs
            ref = self.reference
            out[name] = {"accuracy": round(float((probs.argmax(1) == self.labels).mean()), 6),
                         "agreement": round(float((probs.argmax(1) == ref.argmax(1)).mean()), 6),
                         "max_abs_diff": float(np.abs(probs - ref).max()), "eval_rows": len(self.labels)}
            runs[name] = (run, one)
            batched[name] = probs
        single = {n: np.full(len(self.singles), np.inf) for n in runs}
        alone: dict[str, list[np.ndarray]] = {n: [] for n in runs}
        best = {(n, b): np.full(len(batches), np.inf) for n in runs for b, batches in self.batched.items()}
        for r in range(plan.rounds):
            for name, (run, one) in runs.items():
                for i, f in enumerate(self.singles):
                    start = time.perf_counter()
                    p = one(f)
                    single[name][i] = min(single[name][i], time.perf_counter() - start)
                    if r == 0:
                        alone[name].append(np.asarray(p, dtype=np.float32))
                for b, batches in self.batched.items():
                    for i, f in enumerate(batches):
                        start = time.perf_counter()
                        run(f)
                        best[name, b][i] = min(best[name, b][i], time.perf_counter() - start)
        for name in runs:
            ms = single[name] * 1000
            alone_diff = float(np.abs(np.concatenate(alone[name]) - batched[name][:len(alone[name])]).max())
            out[name].update(
                p50_ms=round(float(np.percentile(ms, 50)), 3), p99_ms=round(float(np.percentile(ms, 99)), 3),
                latency_calls=len(ms), max_abs_diff_alone_vs_batched=alone_diff,
                batch_invariant=alone_diff <= BATCH_INVARIANCE_TOLERANCE,
                rows_per_s={str(b): round(sum(len(next(iter(f.values()))) for f in batches)
                                          / float(best[name, b].sum()), 1) for b, batches in self.batched.items()})
        return out
