"""Helpers shared by the tests of the serving libraries (tests/libs)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np


async def wait_until(predicate: Callable[[], bool], within: float = 5.0, interval: float = 0.005) -> None:
    """Poll `predicate` on the event loop until it is true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


class RecordingInfer:
    """A real numpy inference function, y = x * 2 + 1, that records every batch it receives.

    With `gate` set, each call first signals `entered` and then blocks until the gate
    opens (at most `gate_timeout` seconds, so a failing test cannot hang the suite).
    With `fail_on_nan`, a batch holding a NaN raises ValueError.
    """

    def __init__(self, *, gate: threading.Event | None = None, fail_on_nan: bool = False,
                 gate_timeout: float = 10.0) -> None:
        self.calls: list[np.ndarray] = []
        self.gate = gate
        self.entered = threading.Event()
        self.fail_on_nan = fail_on_nan
        self.gate_timeout = gate_timeout
        self._lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(np.array(x, copy=True))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(self.gate_timeout)
        if self.fail_on_nan and np.isnan(x).any():
            raise ValueError("NaN in batch")
        return {"y": x * 2 + 1}

    @property
    def rows_seen(self) -> np.ndarray:
        """Every row received, in call order."""
        with self._lock:
            return np.concatenate(self.calls) if self.calls else np.empty((0, 2))

    def ids_seen(self) -> set[float]:
        """Request ids (column 0) of every row received."""
        return set(self.rows_seen[:, 0].tolist())


def request(req_id: float, rows: int = 1) -> dict[str, np.ndarray]:
    """A request of `rows` rows whose column 0 is the request id and column 1 the row index."""
    x = np.zeros((rows, 2), dtype=np.float64)
    x[:, 0] = req_id
    x[:, 1] = np.arange(rows)
    return {"x": x}
