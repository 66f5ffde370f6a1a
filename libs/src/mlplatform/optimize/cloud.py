"""The cloud side of the edge comparison: the same predictions through the platform's gateway (REST).

`through_gateway` sends held-out rows one at a time (no concurrency, like one device) to the
gateway and times each round trip; `start_stack` brings the platform up on loopback with the
bench's machinery (Redis, the model's service, Envoy) when no gateway URL is given.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.optimize.subject import Subject

RTT_NOTE = ("a same-region cloud call adds a few ms of network round trip, a mobile network typically 30-100 ms "
            "more (not measured here: loopback only)")


def through_gateway(subject: Subject, url: str, token: str, requests: int,
                    warmup: int = 5) -> tuple[np.ndarray, list[int]]:
    """Milliseconds per request and the predicted class of each of the first `requests` held-out rows."""
    if subject.gateway_request is None or "gateway_label" not in subject.extra:
        raise ValueError(f"{subject.name}: the subject has no gateway request / label mapping")
    parse = subject.extra["gateway_label"]

    def call(i: int) -> tuple[float, int]:
        path, body = subject.gateway_request(i)
        req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as resp:
            payload = json.loads(resp.read())
        return (time.perf_counter() - start) * 1000, parse(payload)

    for i in range(warmup):
        call(i)
    results = [call(i) for i in range(requests)]
    return np.array([r[0] for r in results]), [r[1] for r in results]


@contextlib.contextmanager
def start_stack(model: str, repository: Path) -> Iterator[tuple[str, str]]:
    """(gateway URL, token) of the platform started on loopback for `model` (bench.stack: service + Envoy)."""
    from bench import stack

    with stack.Stack(repository=Path(repository), models=(model,)) as platform:
        assert platform.gateway is not None
        yield f"http://{platform.gateway.target}", stack.tokens(1, "optimize", tier="internal")[0]


def compare(edge: dict[str, Any], edge_format: str, edge_labels: list[int], gateway_ms: np.ndarray,
            gateway_labels: list[int], url: str, batching_delay_ms: float | None = None) -> dict[str, Any]:
    """The report's cloud section: edge p50/p99 beside the gateway's, and what the round trip adds."""
    g50, g99 = float(np.percentile(gateway_ms, 50)), float(np.percentile(gateway_ms, 99))
    n = min(len(edge_labels), len(gateway_labels))
    agree = float(np.mean(np.array(edge_labels[:n]) == np.array(gateway_labels[:n]))) if n else 0.0
    return {"status": "ok", "url": url, "edge_format": edge_format, "requests": len(gateway_ms),
            "edge_p50_ms": edge["p50_ms"], "edge_p99_ms": edge["p99_ms"],
            "gateway_p50_ms": round(g50, 3), "gateway_p99_ms": round(g99, 3),
            "added_p50_ms": round(g50 - edge["p50_ms"], 3), "agreement": round(agree, 4), "rtt_note": RTT_NOTE,
            "batching_delay_ms": batching_delay_ms}
