"""Measure runtime candidates: held-out accuracy and rows/s at batch 1 / 8 / 32, as the build records them.

Speed is the runtime call alone (texts tokenised beforehand), on the same held-out
sentences for every batch size (64 texts: 64 calls of 1, 8 of 8, 2 of 32), so the
figures compare runtimes, not tokenisers or text lengths. On a shared machine a
neighbour's burst slows whatever runs at that moment, so the candidates take turns,
round after round, and each call keeps its fastest time over the rounds; a pass is the
sum of those: the figure closest to what the runtime can do, under the same conditions
for all (a whole pass is long enough to be hit by some burst in every round).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sentiment_service.text import TextEncoder

RuntimeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> probabilities
BATCH_SIZES = (1, 8, 32)
SPEED_TEXTS = 64
SPEED_ROUNDS = 3


def rows_per_second(fns: Mapping[str, RuntimeFn], encoder: TextEncoder, texts: Sequence[str],
                    batch_sizes: Sequence[int] = BATCH_SIZES,
                    rounds: int = SPEED_ROUNDS) -> dict[str, dict[str, float]]:
    """{candidate: {"1": rows/s, "8": ..., "32": ...}}: `texts` over the sum of each call's best time in `rounds`."""
    plans = {b: [encoder.encode(list(texts[i:i + b])) for i in range(0, len(texts), b)] for b in batch_sizes}
    best = {(name, b): np.full(len(plans[b]), np.inf) for name in fns for b in batch_sizes}
    for fn in fns.values():  # first calls allocate and plan: not part of the figure
        for batch in plans[max(batch_sizes)]:
            fn(batch.input_ids, batch.attention_mask)
    for _ in range(rounds):
        for name, fn in fns.items():
            for b, batches in plans.items():
                for i, batch in enumerate(batches):
                    start = time.perf_counter()
                    fn(batch.input_ids, batch.attention_mask)
                    best[name, b][i] = min(best[name, b][i], time.perf_counter() - start)
    return {name: {str(b): round(len(texts) / float(best[name, b].sum()), 1) for b in batch_sizes} for name in fns}


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label (6 decimals)."""
    return round(float((probabilities.argmax(axis=1) == labels).mean()), 6)


def table_markdown(candidates: Mapping[str, Mapping], reference: str) -> str:
    """The candidates as a Markdown table: accuracy, its change against `reference`, rows/s by batch size."""
    sizes = list(next(iter(candidates.values()))["rows_per_s"])
    head = ("| variant | what | held-out accuracy | Δ vs FP32 (points) | "
            + " | ".join(f"rows/s @ {b}" for b in sizes) + " | batch-invariant | qualifies |")
    lines = [head, "|" + "---|" * (6 + len(sizes))]
    ref = float(candidates[reference]["accuracy"])
    for name, c in candidates.items():
        rates = " | ".join(f"{float(r):,.0f}" for r in c["rows_per_s"].values())
        yes = {True: "yes", False: "no"}
        lines.append(f"| {name} | {c['description']} | {float(c['accuracy']):.4f} | "
                     f"{(float(c['accuracy']) - ref) * 100:+.2f} | {rates} | {yes[bool(c['batch_invariant'])]} | "
                     f"{yes[bool(c['qualifies'])]} |")
    return "\n".join(lines)
