"""Batch shape arithmetic, free of any queue: length grouping, padding to allowed sizes, concatenation.

Length-aware batching (variable-length inputs such as token sequences): a closed batch is
sorted by length and cut into contiguous groups wherever that saves more padded positions
than one extra runtime call costs (`overhead`, in positions); each group is padded only to
its longest member. Fixed batch shapes: each runtime call is padded with copies of its last
row up to the smallest allowed size that holds it, so a runtime that sets up every new shape
(CUDA, cuDNN) only sees warmed ones.
"""

from __future__ import annotations

import numpy as np

Tensors = dict[str, np.ndarray]


def pad_rows(inputs: Tensors, rows: int, sizes: list[int]) -> Tensors:
    """`inputs` padded with copies of the last row up to the smallest of `sizes` >= rows (as is if none)."""
    target = next((size for size in sizes if size >= rows), rows)
    if target == rows:
        return inputs
    return {k: np.concatenate([v, np.repeat(v[-1:], target - rows, axis=0)]) for k, v in inputs.items()}


def group_by_length(lengths: list[tuple[int, int]], overhead: int) -> list[list[int]]:
    """Partition requests into runtime calls that minimise padded positions + `overhead` per call.

    `lengths` holds (rows, length) per request. Requests are sorted by length and cut
    into contiguous groups (optimal for this cost, by dynamic programming); the result
    lists request indices per group, shortest group first.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i][1])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]][1]
        rows = 0
        for i in range(j, 0, -1):  # group = sorted[i-1 .. j-1], padded to `longest`
            rows += lengths[order[i - 1]][0]
            cost = best[i - 1] + rows * longest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def concat_inputs(parts: list[Tensors]) -> Tensors:
    """Concatenate each input along the batch axis."""
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}
