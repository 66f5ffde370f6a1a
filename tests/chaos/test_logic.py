"""Pure logic of the chaos runner: comparing answers, the largest legal requests, the soak's flatness and drift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.loadgen import Result
from chaos.scenarios import large_bodies
from chaos.soak import drift, flatness, p99_over_time, parse_duration
from chaos.traffic import comparable, flagged_fallback, same


def test_comparable_answers_ignore_volatile_fields_and_float_noise() -> None:
    a = {"prediction": {"transactionId": "a", "fraudProbability": 0.1234567, "isFraud": False, "cached": True,
                        "modelVersion": "1"}}
    b = {"prediction": {"transactionId": "b", "fraudProbability": 0.1234569, "isFraud": False, "cached": False,
                        "modelVersion": "2"}}
    assert same(comparable(a), comparable(b))
    c = json.loads(json.dumps(b))
    c["prediction"]["isFraud"] = True
    assert not same(comparable(a), comparable(c))
    d = json.loads(json.dumps(b))
    d["prediction"]["fraudProbability"] = 0.2
    assert not same(comparable(a), comparable(d))
    assert not same({"classes": [1, 2]}, {"classes": [1]})
    assert not same({"label": "positive"}, {"label": "negative"})
    assert flagged_fallback({"prediction": {"fallback": True}}) and not flagged_fallback({"prediction": {}})
    assert not flagged_fallback("not json")


def test_largest_legal_requests_are_within_every_limit(model_repository: Path) -> None:
    bodies = dict(large_bodies(model_repository))
    assert set(bodies) == {"/api/v1/cnn", "/api/v1/cnn:batch", "/api/v1/sentiment:batch", "/api/v1/fraud:batch"}
    gateway_limit = 4 * 1024 * 1024  # gateway-envoy variants/local.yaml rest.max_request_body_bytes
    for path, body in bodies.items():
        assert len(body) <= gateway_limit, path
    import base64
    image = base64.b64decode(json.loads(bodies["/api/v1/cnn"])["image"])
    limit = json.loads((model_repository / "cnn" / "1" / "config.json").read_text())["parameters"]["limits"]
    assert 0.9 * limit["max_image_bytes"] <= len(image) <= limit["max_image_bytes"]
    assert len(bodies["/api/v1/cnn:batch"]) > 0.9 * gateway_limit
    texts = json.loads(bodies["/api/v1/sentiment:batch"])["texts"]
    assert len(texts) == 32 and all(len(t) == 4096 for t in texts)
    assert len(json.loads(bodies["/api/v1/fraud:batch"])["transactions"]) == 256


def test_parse_duration() -> None:
    assert parse_duration("30m") == 1800 and parse_duration("90s") == 90 and parse_duration("1h") == 3600
    assert parse_duration("600") == 600
    with pytest.raises(ValueError):
        parse_duration("soon")


def samples(series: dict[str, list[float]], pids: dict[str, list[int]] | None = None) -> list[dict]:
    n = len(next(iter(series.values())))
    return [{"t": 10.0 * i, "rss_mb": {r: s[i] for r, s in series.items()},
             "pid": {r: (pids or {}).get(r, [1] * n)[i] for r in series}} for i in range(n)]


def test_flatness_after_warm_up() -> None:
    flat = [300.0] * 3 + [100.0 + (i % 3) for i in range(40)]  # warm-up growth is excluded
    leak = [100.0 + 2 * i for i in range(43)]
    out = flatness(samples({"fraud": flat, "cnn": leak}), "rss_mb", warmup_s=30)
    assert out["fraud"]["flat"] and abs(out["fraud"]["growth_pct"]) < 2
    assert not out["cnn"]["flat"] and out["cnn"]["growth_pct"] > 5
    restarted = flatness(samples({"fraud": flat}, {"fraud": [1] * 20 + [2] * 23}), "rss_mb", warmup_s=30)
    assert restarted["fraud"]["restarted"]


def test_p99_drift_and_windows() -> None:
    n = 1200
    intended = np.arange(n) / 10.0  # 120 s at 10 req/s
    lat = np.where(intended < 60, 0.010, 0.030)  # p99 triples in the second minute
    res = Result(["fraud/rest"], intended, intended, intended + lat, np.zeros(n, int),
                 np.array(["ok"] * n, dtype=object), 120.0, 10.0, 0.0)
    rows = p99_over_time(res, 60.0)["fraud/rest"]
    assert [r["requests"] for r in rows] == [600, 600]
    assert rows[0]["p99_ms"] == pytest.approx(10, abs=0.1) and rows[1]["p99_ms"] == pytest.approx(30, abs=0.1)
    d = drift(rows, warmup_s=0)
    assert d["ratio"] == pytest.approx(3.0, abs=0.01) and not d["flat"]
    assert drift(rows[:1], 0) == {"flat": None}


def test_process_sampler_reads_memory_descriptors_and_connections() -> None:
    import os
    import socket

    from chaos.soak import ProcessSampler

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        sampler = ProcessSampler(lambda: {"me": os.getpid(), "gone": 2**22 + 1}, interval_s=60,
                                 extra=lambda: {"n": 1})
        row = sampler.sample()
    assert row["rss_mb"]["me"] > 10 and row["fds"]["me"] >= 4 and row["tcp"]["me"] >= 1
    assert "gone" not in row["rss_mb"]  # a process that does not exist is skipped, not an error
    assert row["extra"] == {"n": 1}
    failing = ProcessSampler(lambda: {}, extra=lambda: 1 / 0).sample()
    assert failing["extra"]["error"].startswith("ZeroDivisionError")
