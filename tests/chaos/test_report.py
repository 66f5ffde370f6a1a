"""Scenario bookkeeping: recovery time from a traffic timeline, verdicts against the issue's targets, the report."""

from __future__ import annotations

import json
from pathlib import Path

from chaos.report import Checks, ScenarioResult, Window, fmt_counts, markdown, recovery_time, write


def bins(spec: list[tuple[int, float | None]]) -> list[dict]:
    """A 1 s timeline from (errors, p99_ms) per bin."""
    return [{"t": float(i), "offered_rps": 10.0, "errors": e, "p99_ms": p} for i, (e, p) in enumerate(spec)]


def test_recovery_is_the_end_of_the_last_bad_bin_after_the_fault() -> None:
    tl = bins([(0, 20), (0, 20), (3, 900), (1, 40), (0, 25), (0, 22)])  # fault from 2 to 3 s
    assert recovery_time(tl, fault_end_s=3.0, bin_s=1.0, baseline_p99_ms=20) == 1.0  # bin 3 (3-4 s) still failed


def test_recovery_zero_when_healthy_from_the_fault_end_and_none_when_never() -> None:
    assert recovery_time(bins([(0, 20), (2, 50), (0, 20), (0, 20)]), 2.0, 1.0, 20) == 0.0
    assert recovery_time(bins([(0, 20), (2, 50), (0, 20), (1, 20)]), 2.0, 1.0, 20) is None
    # latency alone counts as unhealthy above max(5 x baseline, 300 ms)
    assert recovery_time(bins([(0, 20), (0, 20), (0, 2000), (0, 250), (0, 20)]), 2.0, 1.0, 20) == 1.0
    assert recovery_time([], 2.0, 1.0, 20) is None


def scenario(expect: str, outcomes: dict[str, int], **kw) -> ScenarioResult:
    r = ScenarioResult("s", "fault", "proves", expect, requests=sum(outcomes.values()), outcomes=outcomes,
                       fault_window=Window(5, 6), recovery_s=kw.pop("recovery_s", 0.5), **kw)
    return r


def test_no_failure_target_counts_refusals_as_failures() -> None:
    assert scenario("no_failure", {"ok": 100}).verdict() == (True, "met")
    met, why = scenario("no_failure", {"ok": 97, "http_429": 3}).verdict()
    assert not met and "3 failed (http_429: 3)" in why
    # the client's own rate-limit bookkeeping is neither a success nor the platform's failure
    assert scenario("no_failure", {"ok": 90, "rate_limited": 10}).verdict()[0]


def test_refusals_only_target_allows_clear_refusals_and_nothing_else() -> None:
    assert scenario("refusals_only", {"ok": 50, "http_429": 30, "resource_exhausted": 5, "unavailable": 2,
                                      "item_resource_exhausted": 4}).verdict()[0]
    met, why = scenario("refusals_only", {"ok": 50, "http_429": 3, "timeout": 2, "internal": 1}).verdict()
    assert not met and "3 not clear refusals" in why and "timeout: 2" in why and "internal: 1" in why


def test_per_target_expectations() -> None:
    r = scenario("no_failure", {"ok": 150, "unavailable": 10},
                 by_target={"fraud/rest": {"ok": 100}, "cnn/grpc": {"ok": 50, "unavailable": 10}},
                 expect_by_target={"cnn/grpc": "refusals_only"})
    assert r.verdict() == (True, "met")
    r.by_target["cnn/grpc"]["internal"] = 2
    met, why = r.verdict()
    assert not met and why.startswith("cnn/grpc: 2 not clear refusals")


def test_wrong_answers_slow_recovery_and_errors_fail_the_verdict() -> None:
    r = scenario("no_failure", {"ok": 100}, checks=Checks(sent=10, same=9, wrong=1))
    assert r.verdict() == (False, "1 answered wrongly")
    assert "recovery 12.0 s > 10 s" in scenario("no_failure", {"ok": 1}, recovery_s=12.0).verdict()[1]
    assert "did not recover" in scenario("no_failure", {"ok": 1}, recovery_s=None).verdict()[1]
    assert "scenario error: boom" in scenario("no_failure", {}, error="boom").verdict()[1]


def test_report_files(tmp_path: Path) -> None:
    good = scenario("no_failure", {"ok": 100})
    bad = scenario("refusals_only", {"ok": 10, "timeout": 4}, data_lost="12 audit entries")
    bad.name = "slow"
    path = write(tmp_path, [good, bad], {"machine": "test"})
    md = path.read_text()
    assert "| s | 100 | - | 0.5 (10) |" in md and "**met**" in md
    assert "| slow | 14 | timeout: 4 |" in md and "**not met**: 4 not clear refusals (timeout: 4)" in md
    assert "12 audit entries" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["met"] for s in data["scenarios"]] == [True, False]
    assert data["scenarios"][1]["unclear"] == {"timeout": 4}
    assert markdown([], {}).startswith("# Chaos run")
    assert fmt_counts({"b": 1, "a": 3}) == "a: 3, b: 1" and fmt_counts({}) == "-"
