"""Scenario bookkeeping: what one scenario measured (requests, outcomes by status, recovery, data lost, answers
checked), its verdict against the issue's target, and the run's report (report.md + report.json)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REFUSAL_STATUSES = frozenset({"resource_exhausted", "unavailable", "http_429", "http_503",
                              "item_resource_exhausted", "item_unavailable"})
"""Clear refusals: the platform says "not now" quickly (admission control, breaker open, no healthy upstream);
`item_*`: the same code on one message of a stream or item of a batch."""
RATE_LIMITED = "rate_limited"
"""The gateway's per-key limit: the chaos client's own keys were too few (a bookkeeping error, not a failure)."""


@dataclass
class Window:
    """When the fault was active, in seconds from the traffic's start."""

    start_s: float
    end_s: float


@dataclass
class Checks:
    """Answers compared with the healthy platform's answer to the same request (the `Verifier`)."""

    sent: int = 0
    same: int = 0
    fallback: int = 0
    """Answered by the model's fallback, flagged as such (fraud): right by contract."""
    wrong: int = 0
    """Answered 200/OK with a different result and no fallback flag: answered wrongly."""
    failed: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add_failure(self, status: str) -> None:
        self.failed[status] = self.failed.get(status, 0) + 1


@dataclass
class ScenarioResult:
    """One scenario's figures. `outcomes` counts every request of the steady traffic by status ("ok", gRPC status
    names, "http_<code>", "timeout", ...); `expect` is the target: "no_failure" (a healthy replica or a fallback
    exists: every request succeeds) or "refusals_only" (no way to answer: only clear refusals allowed)."""

    name: str
    fault: str
    proves: str
    expect: str
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    by_target: dict[str, dict[str, int]] = field(default_factory=dict)
    """Outcomes per model/path of the steady traffic."""
    expect_by_target: dict[str, str] = field(default_factory=dict)
    """A target whose expectation differs from `expect` (e.g. the model without a fallback: refusals_only)."""
    fault_window: Window | None = None
    recovery_s: float | None = None
    recovery_target_s: float = 10.0
    p99_ms_before: float | None = None
    p99_ms_during: float | None = None
    p99_ms_after: float | None = None
    max_ms: float | None = None
    data_lost: str = "none"
    checks: Checks = field(default_factory=Checks)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """Per second of the traffic: offered, ok, refused, timed out, failed, p50 / p99 (report.json only)."""

    @property
    def failures(self) -> dict[str, int]:
        """Every outcome other than ok (and the client's own rate-limit bookkeeping), by status."""
        return {s: n for s, n in self.outcomes.items() if s not in ("ok", RATE_LIMITED)}

    @property
    def refusals(self) -> int:
        return sum(n for s, n in self.failures.items() if s in REFUSAL_STATUSES)

    @property
    def unclear(self) -> dict[str, int]:
        """Failures that are not clear refusals (timeouts, INTERNAL, resets, 500/502/504, ...)."""
        return {s: n for s, n in self.failures.items() if s not in REFUSAL_STATUSES}

    def verdict(self) -> tuple[bool, str]:
        """(met, why) against the target: failures allowed by `expect`, nothing answered wrongly, recovered
        within `recovery_target_s`."""
        problems = []
        if self.error:
            problems.append(f"scenario error: {self.error}")
        if self.requests == 0 and not self.error:
            problems.append("no traffic recorded")
        groups = self.by_target or {"": self.outcomes}
        for target, outcomes in groups.items():
            expect = self.expect_by_target.get(target, self.expect)
            failed = {s: n for s, n in outcomes.items() if s not in ("ok", RATE_LIMITED)}
            unclear = {s: n for s, n in failed.items() if s not in REFUSAL_STATUSES}
            where = f"{target}: " if target else ""
            if expect == "no_failure" and failed:
                problems.append(f"{where}{sum(failed.values())} failed ({fmt_counts(failed)})")
            elif expect == "refusals_only" and unclear:
                problems.append(f"{where}{sum(unclear.values())} not clear refusals ({fmt_counts(unclear)})")
        if self.checks.wrong:
            problems.append(f"{self.checks.wrong} answered wrongly")
        if self.recovery_s is None and self.fault_window is not None and not self.error:
            problems.append("did not recover before the traffic ended")
        elif self.recovery_s is not None and self.recovery_s > self.recovery_target_s:
            problems.append(f"recovery {self.recovery_s:.1f} s > {self.recovery_target_s:g} s")
        return (not problems, "; ".join(problems) or "met")

    def to_json(self) -> dict[str, Any]:
        met, why = self.verdict()
        return {**asdict(self), "failures": self.failures, "refusals": self.refusals, "unclear": self.unclear,
                "met": met, "verdict": why}


def fmt_counts(counts: dict[str, int]) -> str:
    """`http_503: 4, timeout: 1` (largest first); `-` when empty."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def recovery_time(timeline: list[dict[str, Any]], fault_end_s: float, bin_s: float, baseline_p99_ms: float | None,
                  slack: float = 5.0, floor_ms: float = 300.0) -> float | None:
    """Seconds from the fault's end until the traffic is healthy again: the end of the last bin (from the fault's
    start on) with a non-ok request or a p99 above max(`slack` x baseline p99, `floor_ms`), minus `fault_end_s`;
    0 when healthy from the fault's end on; None when the last bin of the timeline is still unhealthy.

    `timeline` is loadgen.Result.timeline(bin_s): per bin `t`, `errors` (non-ok requests intended in the bin) and
    `p99_ms`."""
    limit = max(slack * baseline_p99_ms, floor_ms) if baseline_p99_ms else floor_ms
    bins = [b for b in timeline if b.get("offered_rps", 0) > 0]
    if not bins:
        return None

    def bad(b: dict[str, Any]) -> bool:
        return b["errors"] > 0 or (b["p99_ms"] is not None and b["p99_ms"] > limit)

    if bad(bins[-1]) and bins[-1]["t"] + bin_s > fault_end_s:
        return None
    last_bad = max((b["t"] + bin_s for b in bins if bad(b)), default=None)
    if last_bad is None or last_bad <= fault_end_s:
        return 0.0
    return round(last_bad - fault_end_s, 2)


def _ms(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f}"


def markdown(results: list[ScenarioResult], conditions: dict[str, Any]) -> str:
    """The run's report: conditions, one summary table, then each scenario's detail."""
    lines = ["# Chaos run", "", *(f"- **{k}:** {v}" for k, v in conditions.items()), "",
             "| scenario | requests | failures by status | recovery s (target) | p99 ms before / during / after | "
             "answers checked (same / fallback / wrong) | data lost | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        met, why = r.verdict()
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        c = r.checks
        lines.append(f"| {r.name} | {r.requests} | {fmt_counts(r.failures)} | {rec} ({r.recovery_target_s:g}) | "
                     f"{_ms(r.p99_ms_before)} / {_ms(r.p99_ms_during)} / {_ms(r.p99_ms_after)} | "
                     f"{c.sent} ({c.same} / {c.fallback} / {c.wrong}) | {r.data_lost} | "
                     f"{'**met**' if met else '**not met**: ' + why} |")
    for r in results:
        lines += ["", f"## {r.name}", "", f"- **Fault:** {r.fault}", f"- **Proves:** {r.proves}",
                  f"- **Target:** {'no failed request' if r.expect == 'no_failure' else 'only clear refusals'}, "
                  f"nothing answered wrongly, recovery within {r.recovery_target_s:g} s",
                  f"- **Outcomes:** {fmt_counts(r.outcomes)}; max latency {_ms(r.max_ms)} ms"]
        for target, outcomes in r.by_target.items():
            expect = r.expect_by_target.get(target, r.expect)
            lines.append(f"  - {target} ({'no failure' if expect == 'no_failure' else 'clear refusals only'}): "
                         f"{fmt_counts(outcomes)}")
        if r.fault_window:
            w = r.fault_window
            lines.append(f"- **Fault window:** {w.start_s:.1f} to {w.end_s:.1f} s of the traffic")
        if r.checks.failed or r.checks.examples:
            lines.append(f"- **Checked answers that failed:** {fmt_counts(r.checks.failed)}"
                         + (f"; e.g. {r.checks.examples[0]}" if r.checks.examples else ""))
        for k, v in r.extra.items():
            lines.append(f"- **{k}:** {v}")
        lines += [f"- {n}" for n in r.notes]
        if r.error:
            lines.append(f"- **Error:** {r.error}")
    return "\n".join(lines) + "\n"


def write(out: Path, results: list[ScenarioResult], conditions: dict[str, Any]) -> Path:
    """report.md and report.json under `out`; the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"conditions": conditions,
                                                 "scenarios": [r.to_json() for r in results]}, indent=2,
                                                default=str))
    path = out / "report.md"
    path.write_text(markdown(results, conditions))
    return path
