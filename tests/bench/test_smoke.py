"""`make bench`'s quick variant end to end, so the harness cannot rot: every scenario (raw, cost, curve, mix,
spike, overload, cache) against the real platform (Redis, the three services, Envoy) on loopback, a few seconds
each, then the report with its Targets table.

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
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
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
            assert models[name][path]["capacity"]["text"]
            assert s["service"]["rows"] >= s["ok"]  # the service's own histogram saw every answered call
            assert s["service"]["mean_batch"] >= 1
            assert s["cpu_pct"][name] > 0


def test_mix_spreads_load_over_the_three_models(run_dir: Path) -> None:
    mix = _json(run_dir, "mix")
    assert mix["overall"]["achieved_rps"] > 0 and mix["overall"]["p50_ms"] > 0
    assert set(mix["models"]) == {"fraud", "cnn", "sentiment"}
    assert mix["models"]["fraud"]["requests"] > mix["models"]["cnn"]["requests"] > 0
    assert mix["keys"] >= 1 and "loadgen" in mix["cpu_pct"]
    assert mix["cpu_budget"]["processes"]["loadgen"]["ms_per_request"] > 0
    assert {"envoy", "fraud"} <= set(mix["cpu_budget"]["processes"])
    assert mix["targets"][0]["target"].startswith("mix at") and isinstance(mix["met"], bool)


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


def test_cost_probes_every_server_against_the_floor(run_dir: Path) -> None:
    cost = _json(run_dir, "cost")
    assert set(cost["probes"]) == {"floor", "fraud", "fraud_oip", "cnn"}
    for name, levels in cost["probes"].items():
        assert set(levels) == {"16", "1"}, name
        for row in levels.values():
            assert row["errors"] == {} and row["calls"] > 0 and row["server_ms_per_call"] > 0, (name, row)
    floor = cost["probes"]["floor"]["16"]["server_ms_per_call"]
    assert cost["probes"]["fraud"]["16"]["x_floor"] == pytest.approx(
        cost["probes"]["fraud"]["16"]["server_ms_per_call"] / floor)
    assert cost["probes"]["cnn"]["16"]["runtime_ms_per_image"] > 0
    for kind in ("rest", "grpc"):
        g = cost["gateway"][kind]
        assert g["ok"] == g["answered"] > 0 and g["envoy_ms_per_call"] > 0, g
    assert [t["item"] for t in cost["targets"][:3]] == ["1", "1", "1"]


def test_overload_runs_2x_4x_and_a_spike(run_dir: Path) -> None:
    ov = _json(run_dir, "overload")
    target = ov["by_target"]["sentiment/rest"]
    assert target["capacity"]["rps"] > 0
    runs = target["runs"]
    assert set(runs) == {"2x", "4x", "spike"}
    assert runs["4x"]["offered_rps"] == pytest.approx(2 * runs["2x"]["offered_rps"])
    for run in runs.values():
        s = run["summary"]
        assert s["requests"] > 0 and s["ok"] + s["refused"] + s["timeouts"] + s["failed"] + s["not_sent"] == \
            s["requests"]
        assert run["timeline"] and "goodput_rps" in run["timeline"][0]
    goals = {t["target"].split(": ", 1)[1] for t in ov["targets"]}
    assert {"refusals p99", "client-side timeouts", "latency back to normal after the spike"} <= goals
    assert (run_dir / "overload.png").read_bytes()[:4] == b"\x89PNG"


def test_report_plots_targets_and_price(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    order = [report.index(h) for h in ("## Targets (issue 13)", "## 1. Raw", "## Per-request CPU", "## 2. Per-model",
                                       "## 3. Aggregate", "## 4. Spike", "## Overload", "## 5. Prediction cache",
                                       "## Hot swaps under load", "## Cost per 1000")]
    assert order == sorted(order)
    for png in ("raw", "curve", "spike", "cache", "overload"):
        assert (run_dir / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    figures = json.loads((run_dir / "report.json").read_text())
    assert {"machine", "raw", "cost", "curve", "mix", "spike", "overload", "cache", "swaps", "price",
            "targets"} <= set(figures)
    swaps = figures["swaps"]  # the quick variant: 6 swaps under load, nothing lost or mislabelled
    assert swaps["swaps"] == 6 and len(swaps["rss_mib"]) == 6 and swaps["requests"] > 0
    assert swaps["failures"] == [] and swaps["wrong"] == [] and swaps["not_serving"] == 0
    assert {t["item"] for t in figures["targets"]} >= {"1", "3", "4"}
    # The price section follows from this run's figures (not a product of constants).
    price, curve = figures["price"], figures["curve"]["models"]["fraud"]["grpc"]
    served = price["models"]["fraud"]["served_grpc"]
    assert served["rps_at_slo"] == curve["at_slo"]["achieved_rps"]
    assert served["usd_per_1000_whole_machine"] == pytest.approx(
        price["machine_cpus"] / served["rps_at_slo"] * 1000 / 3600 * price["cpu_core_hour_usd"])
