"""The bench's verdicts on constructed results (no servers): percentiles that count every request, goodput and
refusals apart, achieved rate by completion window, curve breaks and capacity, the mix / overload / cost / peer
targets, the price section and the report's Targets table, the CPU sampler's empty window, a stuck worker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import loadgen, report, verdicts
from bench.loadgen import DROPPED, TIMEOUT, Phase, Result, Target
from bench.stack import Sampler, cpu_delta


def result(latency_s: list[float] | np.ndarray, status: list[str], *, duration_s: float = 10.0,
           intended: np.ndarray | None = None, timeout_s: float = 5.0) -> Result:
    """n requests evenly over `duration_s`, each answered `latency_s` after its intended time (NaN: never)."""
    lat = np.asarray(latency_s, float)
    n = len(lat)
    t = np.arange(n) * duration_s / n if intended is None else intended
    return Result(["fraud/rest"], t, t.copy(), t + lat, np.zeros(n, int), np.array(status, dtype=object),
                  duration_s=duration_s, offered_rate=n / duration_s, start_wall=0.0, timeout_s=timeout_s)


def fast_with_timeouts(n: int = 1000, timeouts: int = 10, fast_s: float = 0.010) -> Result:
    lat = np.full(n, fast_s)
    status = ["ok"] * n
    for i in np.linspace(0, n - 1, timeouts).astype(int):
        lat[i], status[i] = 5.0, TIMEOUT
    return result(lat, status)


# ---------------------------------------------------------------- percentiles count every request

def test_one_percent_timeouts_at_5s_put_p99_at_5s() -> None:
    s = fast_with_timeouts().summary(slo_ms=50)
    assert s["p99_ms"] >= 5000  # the old code reported 10 ms (successes only); interpolation 59.9 ms
    assert s["ok_p99_ms"] == pytest.approx(10.0)
    assert s["timeouts"] == 10 and s["refused"] == 0 and s["error_count"] == 10
    assert s["goodput_rps"] == pytest.approx(990 / s["completion_window_s"])


def test_a_request_never_answered_counts_as_the_timeout() -> None:
    lat = [0.01] * 98 + [np.nan, np.nan]
    s = result(lat, ["ok"] * 98 + [DROPPED, loadgen.GENERATOR_ERROR], timeout_s=3.0).summary()
    assert s["max_ms"] == pytest.approx(3000.0) and s["p99_ms"] == pytest.approx(3000.0)
    assert s["not_sent"] == 2 and s["requests"] == 100


def test_refusals_are_counted_and_timed_apart_from_timeouts() -> None:
    lat = [0.020] * 80 + [0.002] * 15 + [5.0] * 5
    status = ["ok"] * 80 + ["http_429"] * 10 + ["resource_exhausted"] * 5 + [TIMEOUT] * 5
    s = result(lat, status).summary(slo_ms=10)
    assert (s["ok"], s["refused"], s["timeouts"], s["failed"]) == (80, 15, 5, 0)
    assert s["refusal_p99_ms"] == pytest.approx(2.0) and s["refusal_max_ms"] == pytest.approx(2.0)
    assert s["goodput_rps"] == 0.0  # every ok answer took 20 ms, over the 10 ms SLO
    assert s["achieved_rps"] > 0 and s["p99_ms"] >= 5000
    assert s["errors"] == {"http_429": 10, "resource_exhausted": 5, TIMEOUT: 5}


def test_rate_limited_is_neither_a_refusal_nor_ok() -> None:
    s = result([0.001, 0.001], ["ok", loadgen.RATE_LIMITED]).summary()
    assert s["refused"] == 0 and s["failed"] == 1


# ---------------------------------------------------------------- achieved rate by completion window

def test_achieved_rate_is_measured_over_the_window_the_answers_arrived_in() -> None:
    # 100 requests over 10 s, all ok, but the server answered them late: the last at t = 20 s.
    intended = np.arange(100) * 0.1
    late = result(np.linspace(0.0, 10.0, 100) + 0.001, ["ok"] * 100, intended=intended)
    s = late.summary()
    assert s["offered_rps"] == pytest.approx(10.0)
    assert s["completion_window_s"] == pytest.approx(19.901, abs=0.01)
    assert s["achieved_rps"] == pytest.approx(100 / 19.901, rel=0.01)  # the old code said 10/s
    on_time = result([0.001] * 100, ["ok"] * 100, intended=intended).summary()
    assert on_time["achieved_rps"] == pytest.approx(10.0)


def test_timeline_counts_answers_by_arrival_and_latency_by_send_time() -> None:
    intended = np.array([0.1, 0.2, 0.3, 1.1])
    r = result([0.05, 1.0, 0.002, 0.05], ["ok", "ok", "http_503", "ok"], duration_s=2.0, intended=intended)
    tl = r.timeline(1.0, slo_ms=100)
    assert [b["offered_rps"] for b in tl] == [3.0, 1.0]
    assert [b["achieved_rps"] for b in tl] == [1.0, 2.0]  # the 1 s answer arrived in the second bin
    assert [b["goodput_rps"] for b in tl] == [1.0, 1.0]
    assert tl[0]["refused_rps"] == 1.0 and tl[0]["p99_ms"] == pytest.approx(1000.0)


def test_latency_counts_from_the_intended_send_time_not_the_actual_one() -> None:
    # The second request left 50 ms late (the generator was busy): its latency includes those 50 ms.
    r = Result(["fraud/grpc"], np.array([0.0, 0.1, 0.2, 0.3]), np.array([0.0, 0.15, 0.2, np.nan]),
               np.array([0.01, 0.16, 0.25, np.nan]), np.zeros(4, int),
               np.array(["ok", "ok", "unavailable", DROPPED], dtype=object), duration_s=1.0, offered_rate=4,
               start_wall=0.0, timeout_s=5.0)
    assert np.allclose(r.latency[:3], [0.01, 0.06, 0.05])
    s = r.summary()
    assert s["requests"] == 4 and s["ok"] == 2 and s["error_count"] == 2
    assert s["errors"] == {"unavailable": 1, DROPPED: 1}
    assert s["ok_p50_ms"] == pytest.approx(60.0) and s["max_ms"] == pytest.approx(5000.0)
    assert s["send_lag_max_ms"] == pytest.approx(50.0)
    assert s["achieved_rps"] == 2.0 and s["offered_rps"] == 4.0


# ---------------------------------------------------------------- curve: broken, capacity

def step(lat_ms: float = 10.0, n: int = 1000, bad: int = 0, bad_status: str = TIMEOUT, bad_s: float = 5.0,
         late_s: float = 0.0) -> dict[str, Any]:
    lat = np.full(n, lat_ms / 1000) + np.linspace(0, late_s, n)
    status = ["ok"] * n
    for i in range(bad):
        lat[i * (n // max(bad, 1))], status[i * (n // max(bad, 1))] = bad_s, bad_status
    return result(lat, status).summary(slo_ms=50)


def test_broken_on_constructed_steps() -> None:
    assert verdicts.broken(step(), 50) is None
    assert verdicts.broken(step(bad=10), 50).startswith("p99 5000.0 ms")  # 1 % at 5 s: p99 breaks
    assert "not ok 20/1000" in verdicts.broken(step(bad=20, bad_status="http_429", bad_s=0.001), 50)
    assert verdicts.broken(step(lat_ms=60), 50) == "p99 60.0 ms > SLO 50 ms"
    assert verdicts.broken(step(late_s=5.0), 50).startswith("p99")
    no_answers = result([np.nan] * 4, [DROPPED] * 4).summary()
    assert verdicts.broken(no_answers, 50).startswith("not ok 4/4")


def test_broken_when_the_backlog_is_cleared_late() -> None:
    s = step(lat_ms=10.0, late_s=3.0)  # latency grows to 3 s: p99 breaks first
    assert verdicts.broken(s, 5000) is not None and "achieved" in verdicts.broken(s, 5000)


def test_capacity_says_at_least_when_the_curve_never_broke() -> None:
    held = [{"achieved_rps": 100.0, "broken": None}, {"achieved_rps": 199.0, "broken": None}]
    assert verdicts.capacity(held) == {"rps": 199.0, "lower_bound": True, "text": "≥ 199"}
    broke = [*held, {"achieved_rps": 250.0, "broken": "p99 80 ms > SLO 50 ms"}]
    assert verdicts.capacity(broke) == {"rps": 199.0, "lower_bound": False, "text": "199"}
    assert verdicts.capacity([{"achieved_rps": 5.0, "broken": "errors"}])["text"] == "none held the SLO"
    assert verdicts.capacity([])["text"] == "not measured"


# ---------------------------------------------------------------- mix

def test_mix_met_and_not_met() -> None:
    slos = {"fraud": 50.0, "cnn": 100.0}
    good = {"fraud": {"p99_ms": 20.0}, "cnn": {"p99_ms": 90.0}}
    overall = {"achieved_rps": 995.0, "error_count": 0, "errors": {}}
    rows = verdicts.mix_rows(1000, overall, good, slos)
    assert verdicts.all_met(rows) and len(rows) == 4
    slow = {"fraud": {"p99_ms": 20.0}, "cnn": {"p99_ms": 101.0}}
    assert [r["met"] for r in verdicts.mix_rows(1000, overall, slow, slos)] == [True, True, False, True]
    short = {"achieved_rps": 323.0, "error_count": 40599, "errors": {"timeout": 40599}}
    rows = verdicts.mix_rows(1000, short, good, slos)
    assert [r["met"] for r in rows] == [False, True, True, False]
    assert "timeout 40599" in rows[-1]["measured"]
    assert not verdicts.all_met([]) and not verdicts.all_met([verdicts.row("4", "x", "y", "z", None)])


def test_cpu_budget_per_process() -> None:
    from bench.scenarios import cpu_budget

    b = cpu_budget({"envoy": 30.0, "fraud": 20.0, "loadgen": 10.0}, 60_000, {"fraud": 42_000}, 1000.0, 2)
    assert b["budget_ms_per_request"] == pytest.approx(2.0)
    assert b["processes"]["envoy"]["ms_per_request"] == pytest.approx(0.5)
    assert b["processes"]["envoy"]["budget_share"] == pytest.approx(0.25)
    assert b["processes"]["fraud"]["ms_per_own_request"] == pytest.approx(20_000 / 42_000)
    assert b["total_ms_per_request"] == pytest.approx(1.0) and b["max_rps_on_cores"] == pytest.approx(2000.0)
    assert list(b["processes"]) == ["envoy", "fraud", "loadgen"]  # busiest first


# ---------------------------------------------------------------- overload

def test_recovery_after_a_spike() -> None:
    def tl(p99s: list[float | None]) -> list[dict[str, Any]]:
        return [{"t": 0.5 * i, "p99_ms": v} for i, v in enumerate(p99s)]

    # spike ends at t = 2.0 (bin 4); normal p99 20 ms -> the limit is 40 ms; settled = 2 s (4 bins) within it
    assert verdicts.recovery_s(tl([20, 20, 900, 900, 20, 20, 20, 20, 20]), 2.0, 20.0, 0.5) == 0.0
    assert verdicts.recovery_s(tl([20, 20, 900, 900, 900, 900, 30, 20, 20, 20, 20]), 2.0, 20.0, 0.5) == 1.0
    # an isolated slow bin long after the recovery does not undo it
    assert verdicts.recovery_s(tl([20, 20, 900, 900, 20, 20, 20, 20, 20, 300, 20]), 2.0, 20.0, 0.5) == 0.0
    # a relapse inside the first two seconds does
    assert verdicts.recovery_s(tl([20, 20, 900, 900, 20, 900, 20, 20, 20, 20]), 2.0, 20.0, 0.5) == 1.0
    assert verdicts.recovery_s(tl([20, 20, 900, 900, 900, 900]), 2.0, 20.0, 0.5) is None
    assert verdicts.recovery_s(tl([20, 900, 900]), 2.0, None, 0.5) is None
    assert verdicts.recovery_s(tl([20, 20, 900, 900, 900, 20]), 2.0, 20.0, 0.5) == 0.5  # settled to the end
    assert verdicts.recovery_s(tl([2, 2, 900, 900, 11, 2]), 2.0, 2.0, 0.5) == 0.0  # +10 ms floor: 12 ms


def test_queue_wait_over_the_budget_from_histograms() -> None:
    before = {"0.1": 10.0, "0.2": 12.0, "0.3": 12.0, "+Inf": 13.0}
    after = {"0.1": 60.0, "0.2": 80.0, "0.3": 85.0, "+Inf": 90.0}
    assert verdicts.queue_wait_over(before, after, 0.2) == 77.0 - 68.0
    assert verdicts.queue_wait_over(before, after, 0.25) == 77.0 - 68.0
    assert verdicts.queue_wait_over({}, {"0.2": 5.0, "+Inf": 5.0}, 0.2) == 0.0
    assert verdicts.queue_wait_over({}, {}, 0.2) is None


def test_overload_rows() -> None:
    shed = result([0.05] * 90 + [0.003] * 10, ["ok"] * 90 + ["http_429"] * 10).summary(slo_ms=200)
    rows = verdicts.overload_rows("sentiment at 2x", shed, capacity_rps=9.0, queue_over=0.0, budget_ms=200)
    assert [r["met"] for r in rows] == [True, True, True, True]
    collapse = fast_with_timeouts(timeouts=300).summary(slo_ms=50)
    rows = verdicts.overload_rows("x", collapse, capacity_rps=100.0, queue_over=250.0, budget_ms=50)
    assert [r["met"] for r in rows] == [False, None, False, False]  # no refusals: nothing to time
    slow_refusals = result([0.05] * 90 + [0.5] * 10, ["ok"] * 90 + ["unavailable"] * 10).summary(slo_ms=200)
    assert verdicts.overload_rows("x", slow_refusals, 9.0, None, 200)[1]["met"] is False
    unknown = verdicts.overload_rows("x", shed, 9.0, 0.0, 200, capacity_lower_bound=True)[0]
    assert unknown["met"] is None and "≥ 9" in unknown["measured"] and "not judged" in unknown["goal"]
    spike = verdicts.overload_rows("spike", shed, 9.0, 0.0, 200, recovery=2.5, spike=True)
    assert spike[0]["target"] == "spike: refusals p99" and spike[-1]["met"] is False


# ---------------------------------------------------------------- cost, peer

def test_cost_rows_against_the_floor() -> None:
    rows = verdicts.cost_rows({"floor": {16: 0.34, 1: 0.5}, "fraud": {16: 0.45, 1: 0.59}}, {"rest": 0.25})
    assert [r["met"] for r in rows] == [True, True, True]
    assert "1.32x" in rows[0]["measured"]
    rows = verdicts.cost_rows({"floor": {16: 0.34}, "fraud": {16: 0.80, 1: 1.16}}, {"rest": 1.25})
    assert [r["met"] for r in rows] == [False, False, False]
    assert [r["met"] for r in verdicts.cost_rows({}, {})] == [None, None, None]


def test_peer_rows_at_32_in_flight() -> None:
    peer = {"levels": [{"mode": "concurrency", "value": 1, "ours": {}, "mlserver": {}},
                       {"mode": "concurrency", "value": 32, "ours": {"rps": 1700.0, "p99_ms": 30.0},
                        "mlserver": {"rps": 1000.0, "p99_ms": 40.0}}]}
    rows = verdicts.peer_rows(peer)
    assert [r["met"] for r in rows] == [False, True] and "1.70x" in rows[0]["measured"]
    assert verdicts.peer_rows({}) == []


# ---------------------------------------------------------------- price and efficiency (replaces a test of constants)

def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


def test_price_and_efficiency_from_constructed_runs(tmp_path: Path) -> None:
    write_json(tmp_path / "raw.json", {"models": {"fraud": {"batches": {
        "1": {"rows_per_core_s": 2000.0}, "32": {"rows_per_core_s": 20000.0}}}}})
    at = {"achieved_rps": 500.0, "cpu_pct": {"fraud": 50.0, "envoy": 50.0}}
    write_json(tmp_path / "curve.json", {"models": {"fraud": {"grpc": {"at_slo": at}, "rest": {"at_slo": at}}}})
    data = report.price(tmp_path, cpu_core_hour_usd=0.036, gpu_hour_usd=4.0)
    f = data["models"]["fraud"]
    # runtime: 1/20000 core-s per row; 1000 rows = 0.05 core-s = 0.05/3600 h x $0.036
    assert f["raw_cpu"]["batch"] == 32 and f["raw_cpu"]["usd_per_1000"] == pytest.approx(0.05 / 3600 * 0.036)
    assert f["served_grpc"]["server_cores"] == pytest.approx(0.5)
    assert f["served_grpc"]["rps_per_server_core"] == pytest.approx(1000.0)
    assert f["served_rest"]["rps_per_server_core"] == pytest.approx(500.0)  # service + Envoy: one core
    assert f["served_rest"]["usd_per_1000_server_cpu"] == pytest.approx(2 * f["served_grpc"]["usd_per_1000_server_cpu"])
    assert f["efficiency"] == pytest.approx({"grpc_vs_batch1": 0.5, "grpc_vs_best": 0.05, "rest_vs_best": 0.025})
    assert "## Cost per 1000" in (tmp_path / "price.md").read_text()
    assert "served_grpc" not in data["models"]["cnn"]  # no curve for cnn: nothing invented


def test_efficiency_without_served_figures() -> None:
    raw = {"batch1_rows_per_core_s": 100.0, "rows_per_core_s": 400.0}
    assert report.efficiency(raw, {"rps_per_server_core": 50.0}, {}) == {
        "grpc_vs_batch1": 0.5, "grpc_vs_best": 0.125, "rest_vs_best": None}


def test_report_targets_table_comes_first(tmp_path: Path) -> None:
    write_json(tmp_path / "mix.json", {"targets": [verdicts.row("4", "mix achieved", "323", "≥ 990", False)]})
    write_json(tmp_path / "cost.json", {"targets": [verdicts.row("1", "fraud 16", "1.85x", "≤ 1.35x", False),
                                                    verdicts.row("1", "oip", "0.6 ms", "reported", None)]})
    (tmp_path / "mix.md").write_text("## 3. Aggregate mix\n")
    path = report.assemble(tmp_path, ["python -m bench mix"])
    text = path.read_text()
    assert text.index("## Targets (issue 13)") < text.index("## 3. Aggregate mix")
    assert "0 of 2 judged targets met" in text
    assert "| 1 | fraud 16 | 1.85x | ≤ 1.35x | **not met** |" in text and "| 1 | oip | 0.6 ms | reported | — |" in text
    figures = json.loads((tmp_path / "report.json").read_text())
    assert [r["item"] for r in figures["targets"]] == ["1", "1", "4"]


# ---------------------------------------------------------------- sampler and workers

def test_cpu_means_of_an_empty_window_is_empty_not_every_sample() -> None:
    sampler = Sampler({}, {})
    sampler.samples = [{"t": t, "cpu": {"fraud": 50.0 + t}, "machine_cpu": 100.0} for t in (0.5, 1.0, 1.5)]
    assert sampler.cpu_means(0.9, 1.6) == {"fraud": pytest.approx(51.25), "machine": 100.0}
    assert sampler.cpu_means(10.0, 20.0) == {}
    assert cpu_delta({"a": 1.0, "b": 2.0}, {"a": 1.5, "c": 9.0}) == {"a": 0.5}


def _stuck_worker(job: loadgen.WorkerJob, conn: Any) -> None:
    """A worker that gets ready, then never sends its records (a hung client)."""
    conn.send("ready")
    conn.recv()
    time.sleep(3600)


def test_a_stuck_worker_is_reported_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen, "_worker_main", _stuck_worker)
    t0 = time.monotonic()
    r = loadgen.run([Target("fraud", "grpc", "127.0.0.1:9")], [Phase(0.5, 10)], processes=1, timeout_s=0.5,
                    result_margin_s=0.5)
    assert time.monotonic() - t0 < 30
    assert len(r.errors) == 1 and "stuck" in r.errors[0]
    assert set(r.status) == {loadgen.GENERATOR_ERROR}
    s = r.summary()
    assert s["not_sent"] == 5 and s["p99_ms"] == pytest.approx(500.0)  # never answered: the timeout


def test_overload_ramp_refines_the_curve_capacity(tmp_path: Path) -> None:
    from bench.overload import curve_capacity, ramp_rates

    assert curve_capacity(tmp_path, "sentiment", "rest") is None
    write_json(tmp_path / "curve.json", {"models": {"sentiment": {"rest": {"capacity": {
        "rps": 40.0, "lower_bound": True, "text": "≥ 40"}}}}})
    assert curve_capacity(tmp_path, "sentiment", "rest") == 40.0
    assert ramp_rates(40.0, [10, 20], (1.0, 1.15, 1.5)) == [40.0, 46.0, 60.0]
    assert ramp_rates(None, [10, 20], (1.0, 1.5)) == [10, 20]
