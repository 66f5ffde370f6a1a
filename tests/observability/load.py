"""Steady Open Inference Protocol traffic to the `diabetes` model for the observability tests: a few client threads,
each at a bounded rate, stopping by themselves after `max_s`. Rows are random within the model's declared limits
(every one a cache miss) except one request in four, drawn from four fixed rows (cache hits after their first).
Every answer's status is counted, with its latency."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

REPEATED_SHARE = 0.25


@dataclass
class Sample:
    at: float  # time.monotonic() at the answer
    status: str
    latency_s: float


@dataclass
class Load:
    """Clients calling `model` at `target` (host:port) until `stop()` or `max_s` seconds."""

    target: str
    limits: tuple[list[float], list[float]]
    model: str = "diabetes"
    threads: int = 4
    rate_per_thread: float = 10.0
    max_s: float = 240.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(15)

    def since(self, t0: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.at >= t0]

    def statuses(self, t0: float) -> Counter[str]:
        return Counter(s.status for s in self.since(t0))

    def _run(self, worker: int) -> None:
        # tritonclient's stubs of the protocol: never import the platform's own `inference` stubs in this process
        import tritonclient.grpc as tc
        from tritonclient.utils import InferenceServerException

        rng = np.random.default_rng(worker)
        low, high = (np.asarray(v, np.float32) for v in self.limits)
        repeated = np.random.default_rng(99).uniform(low, high, (4, len(low))).astype(np.float32)
        client = tc.InferenceServerClient(self.target)
        end = time.monotonic() + self.max_s
        period = 1.0 / self.rate_per_thread
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                started = time.monotonic()
                if rng.random() < REPEATED_SHARE:
                    row = repeated[rng.integers(len(repeated))][np.newaxis]
                else:
                    row = rng.uniform(low, high, (1, len(low))).astype(np.float32)
                inp = tc.InferInput("features", list(row.shape), "FP32")
                inp.set_data_from_numpy(row)
                try:
                    result = client.infer(self.model, [inp], client_timeout=30)
                    status = "OK" if result.as_numpy("progression").shape == (1, 1) else "BAD_ANSWER"
                except InferenceServerException as exc:
                    status = (exc.status() or "UNKNOWN").removeprefix("StatusCode.")
                now = time.monotonic()
                with self._lock:
                    self.samples.append(Sample(now, status, now - started))
                self._stop.wait(max(0.0, period - (now - started)))
        finally:
            client.close()
