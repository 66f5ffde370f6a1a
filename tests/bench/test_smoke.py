"""`make bench`'s quick variant end to end, so the harness cannot rot: scenarios 1-5 against the real
platform (Redis, the three services, Envoy) on loopback, a few seconds each, then the report.

Runs `python -m bench all --quick` as a subprocess (the bench may import the OIP stubs, which the
test process must not). Asserts on the figures it wrote, not on speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import ROOT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--out", str(out),
                           "--model-repository", str(model_repository)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[" in proc.stdout and "report:" in proc.stdout  # progress lines
    return out


def _json(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / f"{name}.json").read_text())


def test_raw_baseline_has_every_model_and_batch(run_dir: Path) -> None:
    models = _json(run_dir, "raw")["models"]
    assert set(models["fraud"]["batches"]) == {"1", "8", "32", "256"}
    assert set(models["cnn"]["batches"]) == set(models["sentiment"]["batches"]) == {"1", "8", "32"}
    for m in models.values():
        for row in m["batches"].values():
            assert row["p50_ms"] > 0 and row["rows_per_s"] > 0 and row["calls"] >= 3


def test_curve_served_every_model_both_paths(run_dir: Path) -> None:
    models = _json(run_dir, "curve")["models"]
    for name in ("fraud", "cnn", "sentiment"):
        for path in ("grpc", "rest"):
            steps = models[name][path]["steps"]
            assert steps, (name, path)
            s = steps[0]
            assert s["requests"] > 0 and s["ok"] > 0 and s["achieved_rps"] > 0
            assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
            assert s["service"]["rows"] >= s["ok"]  # the service's own histogram saw every answered call
            assert s["service"]["mean_batch"] >= 1
            assert s["cpu_pct"][name] > 0


def test_mix_spreads_load_over_the_three_models(run_dir: Path) -> None:
    mix = _json(run_dir, "mix")
    assert mix["overall"]["achieved_rps"] > 0 and mix["overall"]["p50_ms"] > 0
    assert set(mix["models"]) == {"fraud", "cnn", "sentiment"}
    assert mix["models"]["fraud"]["requests"] > mix["models"]["cnn"]["requests"] > 0
    assert mix["keys"] >= 1 and "loadgen" in mix["cpu_pct"]


def test_spike_accounts_for_every_request(run_dir: Path) -> None:
    spike = _json(run_dir, "spike")
    assert spike["requests"] > 0 and spike["lost"] == 0
    assert spike["answered"] + spike["not_sent"] == spike["requests"]
    rates = [p["rate"] for p in spike["by_phase"]]
    assert rates[1] > rates[0] and spike["by_phase"][1]["offered_rps"] > spike["by_phase"][0]["offered_rps"]
    assert spike["samples"] and "fraud" in spike["samples"][0]["queue_depth"]


def test_cache_hits_with_repeated_transactions(run_dir: Path) -> None:
    modes = _json(run_dir, "cache")["modes"]
    assert modes["redis"]["service"]["cache_hits"] > 0
    assert 0 < modes["redis"]["service"]["cache_hit_rate"] < 0.6
    assert modes["off"]["service"]["cache_hit_rate"] is None
    assert modes["off"]["service"]["rows"] >= modes["off"]["ok"]


def test_report_plots_and_cost(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    order = [report.index(h) for h in ("## 1. Raw", "## 2. Per-model", "## 3. Aggregate", "## 4. Spike",
                                       "## 5. Prediction cache", "## Cost per 1000")]
    assert order == sorted(order)
    for png in ("raw", "curve", "spike", "cache"):
        assert (run_dir / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    figures = json.loads((run_dir / "report.json").read_text())
    assert {"machine", "raw", "curve", "mix", "spike", "cache", "cost"} <= set(figures)
    cost = figures["cost"]["models"]
    assert cost["fraud"]["served_grpc"]["usd_per_1000_whole_machine"] > 0
    assert cost["cnn"]["gpu_runtime_estimate"]["usd_per_1000"] > 0
