"""The bench's verdicts as pure functions of measured figures (no servers, no plotting), so tests can assert
them on constructed results: when a curve step breaks its SLO, what a curve's capacity is (and whether it is
only a lower bound), whether the mix and the overload targets of issue 13 are met, how fast latency recovers
after a spike, and the rows of the report's "Targets" table.

A target row is a dict: `item` (the issue's item), `target` (what is measured), `measured` (text), `goal`
(text) and `met` (True / False, or None when there was nothing to judge, e.g. no refusals to time).
"""

from __future__ import annotations

from typing import Any

MAX_ERROR_FRACTION = 0.01
"""A curve step breaks when more than this fraction of its requests are not ok (refused, timed out, failed)."""
MIN_ACHIEVED_FRACTION = 0.9
"""... or when the completion rate falls below this fraction of the offered rate."""
MIX_ACHIEVED_FRACTION = 0.99
"""The mix's achieved rate (completion window) must reach this fraction of the offered rate: the window ends
at the last answer, so even a perfect server reports a little less than the offered rate."""
GOODPUT_FRACTION = 0.9
"""Overload: goodput at 2x / 4x capacity must stay at or above this fraction of the capacity."""
REFUSAL_P99_MS = 20.0
"""Overload: refusals must be answered fast, p99 below this."""
RECOVERY_S = 2.0
"""Spike: latency back to normal within this many seconds after the spike."""
FLOOR_RATIO = 1.35
"""Cost: fraud's server CPU per request at 16 in flight, at most this multiple of the gRPC floor's."""
FRAUD_SERIAL_MS = 0.6
"""Cost: fraud's server CPU per request at 1 in flight, at most this (ms)."""
ENVOY_REST_MS = 0.3
"""Cost: Envoy's CPU per REST call at ~500 req/s, at most this (ms)."""


def fmt(v: float | None, digits: int = 1) -> str:
    """A number for a table, "—" for none."""
    return "—" if v is None else f"{v:.{digits}f}"


def row(item: str, target: str, measured: str, goal: str, met: bool | None) -> dict[str, Any]:
    """One line of the Targets table."""
    return {"item": item, "target": target, "measured": measured, "goal": goal, "met": met}


def verdict_text(met: bool | None) -> str:
    """met / not met / — (nothing to judge)."""
    return "—" if met is None else ("met" if met else "**not met**")


def targets_table(rows: list[dict[str, Any]], *, with_item: bool = False) -> list[str]:
    """Markdown lines of a Targets table (target, measured, goal, verdict; the issue's item first if asked)."""
    cols = ["item"] * with_item + ["target", "measured", "goal"]
    lines = ["| " + " | ".join([*cols, "verdict"]) + " |", "|" + "---|" * (len(cols) + 1)]
    return lines + ["| " + " | ".join([*(str(r[c]) for c in cols), verdict_text(r["met"])]) + " |" for r in rows]


# ---------------------------------------------------------------- curve

def broken(s: dict[str, Any], slo_ms: float) -> str | None:
    """Why a curve step (a `Result.summary`) breaks its SLO, or None when it holds: more than 1 % of the
    requests not ok, p99 over every request above the SLO, or completions below 90 % of the offered rate."""
    if s["requests"] == 0:
        return "no requests"
    if s["error_count"] > MAX_ERROR_FRACTION * s["requests"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items(), key=lambda kv: -kv[1]))
        return f"not ok {s['error_count']}/{s['requests']} ({kinds})"
    if s["p99_ms"] is None or s["p99_ms"] > slo_ms:
        return f"p99 {fmt(s['p99_ms'])} ms > SLO {slo_ms:.0f} ms"
    if s["achieved_rps"] < MIN_ACHIEVED_FRACTION * s["offered_rps"]:
        return f"achieved {s['achieved_rps']:.0f} < 90 % of offered {s['offered_rps']:.0f}"
    return None


def capacity(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """A ramp's capacity: the highest achieved rate of a step that held its SLO (`broken` None). When no step
    broke, the ramp never found the limit: `lower_bound` is True and the text says "≥"."""
    ok = [s for s in steps if not s.get("broken")]
    best = max((s["achieved_rps"] for s in ok), default=0.0)
    lower = bool(steps) and not any(s.get("broken") for s in steps)
    text = f"{'≥ ' if lower else ''}{best:.0f}" if ok else ("none held the SLO" if steps else "not measured")
    return {"rps": best, "lower_bound": lower, "text": text}


# ---------------------------------------------------------------- mix

def mix_rows(offered_rps: float, overall: dict[str, Any], per_model: dict[str, dict[str, Any]],
             slos: dict[str, float]) -> list[dict[str, Any]]:
    """The mix targets (item 4): achieved ≥ 99 % of the offered rate by completion window, every model's p99
    (every request counted) within its SLO, zero errors (anything not ok, refusals and timeouts included)."""
    floor = MIX_ACHIEVED_FRACTION * offered_rps
    rows = [row("4", f"mix at {offered_rps:g} req/s offered: achieved (completion window)",
                f"{overall['achieved_rps']:.1f} req/s", f"≥ {floor:g} req/s (99 % of offered)",
                overall["achieved_rps"] >= floor)]
    for m, s in per_model.items():
        rows.append(row("4", f"mix: {m} p99 (every request)", f"{fmt(s['p99_ms'])} ms", f"≤ {slos[m]:.0f} ms",
                        s["p99_ms"] is not None and s["p99_ms"] <= slos[m]))
    kinds = ", ".join(f"{k} {v}" for k, v in overall["errors"].items())
    rows.append(row("4", "mix: errors (not ok, of every kind)",
                    f"{overall['error_count']}" + (f" ({kinds})" if kinds else ""), "0", overall["error_count"] == 0))
    return rows


def all_met(rows: list[dict[str, Any]]) -> bool:
    """Every row judged and met."""
    return bool(rows) and all(r["met"] is True for r in rows)


# ---------------------------------------------------------------- overload

def recovery_s(timeline: list[dict[str, Any]], spike_end: float, normal_p99_ms: float | None,
               bin_s: float, hold_s: float = 2.0) -> float | None:
    """Seconds from the spike's end until latency is back to normal: the start of the first stretch of bins (by
    intended send time, at or after `spike_end`) whose p99 stays within max(2x the pre-spike p99, pre-spike p99
    + 10 ms) for `hold_s` (or to the end of the schedule), minus `spike_end`. A later isolated slow bin does not
    undo a recovery. None when latency never settles or there is no pre-spike figure."""
    if normal_p99_ms is None:
        return None
    limit = max(2 * normal_p99_ms, normal_p99_ms + 10.0)
    after = [b for b in timeline if b["t"] >= spike_end - 1e-9 and b["p99_ms"] is not None]
    need = max(1, round(hold_s / bin_s))
    for i in range(len(after)):
        stretch = after[i:i + need]
        if all(b["p99_ms"] <= limit for b in stretch):
            return max(0.0, after[i]["t"] - spike_end)
    return None


def queue_wait_over(buckets_before: dict[str, float], buckets_after: dict[str, float],
                    budget_s: float) -> float | None:
    """Observations of a cumulative queue-wait histogram (le -> count) above `budget_s` between two scrapes:
    count(+Inf) - count(largest bucket ≤ budget). None when the histogram was not exported."""
    if "+Inf" not in buckets_after:
        return None

    def delta(le: str) -> float:
        return buckets_after.get(le, 0.0) - buckets_before.get(le, 0.0)

    within = [le for le in buckets_after if le != "+Inf" and float(le) <= budget_s + 1e-12]
    below = max((delta(le) for le in within), default=0.0)
    return delta("+Inf") - below


def overload_rows(label: str, s: dict[str, Any], capacity_rps: float, queue_over: float | None,
                  budget_ms: float, recovery: float | None = None, spike: bool = False,
                  capacity_lower_bound: bool = False) -> list[dict[str, Any]]:
    """Item 3's targets for one overload run (`s`: its `Result.summary` with the SLO): goodput ≥ 90 % of
    capacity, refusals p99 < 20 ms, zero client-side timeouts, no queue wait above the budget, and for a spike
    latency back to normal within 2 s. When the capacity is only a lower bound the run may not have overloaded
    anything: goodput is then reported, not judged."""
    rows = []
    if not spike:
        need = GOODPUT_FRACTION * capacity_rps
        measured = (f"{s['goodput_rps']:.0f} req/s ({s['goodput_rps'] / capacity_rps:.0%} of capacity "
                    f"{'≥ ' if capacity_lower_bound else ''}{capacity_rps:.0f})" if capacity_rps
                    else f"{s['goodput_rps']:.0f} req/s")
        judged = bool(capacity_rps) and not capacity_lower_bound
        rows.append(row("3", f"{label}: goodput (ok within SLO, per s)", measured,
                        f"≥ {need:.0f} req/s (90 %)" + ("" if judged else ": capacity unknown, not judged"),
                        s["goodput_rps"] >= need if judged else None))
    rows.append(row("3", f"{label}: refusals p99",
                    f"{fmt(s['refusal_p99_ms'])} ms ({s['refused']} refused)" if s["refused"] else "no refusals",
                    f"< {REFUSAL_P99_MS:.0f} ms",
                    s["refusal_p99_ms"] < REFUSAL_P99_MS if s["refused"] else None))
    rows.append(row("3", f"{label}: client-side timeouts", f"{s['timeouts']} of {s['requests']}", "0",
                    s["timeouts"] == 0))
    rows.append(row("3", f"{label}: queue waits above the {budget_ms:.0f} ms budget",
                    "not exported" if queue_over is None else f"{queue_over:.0f}", "0",
                    None if queue_over is None else queue_over == 0))
    if spike:
        rows.append(row("3", f"{label}: latency back to normal after the spike",
                        "not recovered by the end" if recovery is None else f"{recovery:.1f} s",
                        f"≤ {RECOVERY_S:.0f} s", recovery is not None and recovery <= RECOVERY_S))
    return rows


# ---------------------------------------------------------------- cost (item 1)

def cost_rows(per_request_ms: dict[str, dict[int, float | None]], envoy_ms: dict[str, float | None]
              ) -> list[dict[str, Any]]:
    """Item 1's targets from server CPU ms per request (`per_request_ms[probe][in_flight]`, probes "floor" and
    "fraud") and Envoy's CPU ms per call (`envoy_ms["rest"]`): fraud ≤ 1.35x the floor at 16 in flight,
    fraud ≤ 0.6 ms at 1 in flight, Envoy ≤ 0.3 ms per REST call."""
    floor16 = per_request_ms.get("floor", {}).get(16)
    fraud16 = per_request_ms.get("fraud", {}).get(16)
    fraud1 = per_request_ms.get("fraud", {}).get(1)
    ratio = fraud16 / floor16 if fraud16 is not None and floor16 else None
    rest = envoy_ms.get("rest")
    return [
        row("1", "fraud typed Predict: server CPU per request at 16 in flight vs the gRPC floor",
            f"{fmt(fraud16, 3)} ms = {fmt(ratio, 2)}x floor {fmt(floor16, 3)} ms", f"≤ {FLOOR_RATIO}x floor",
            None if ratio is None else ratio <= FLOOR_RATIO),
        row("1", "fraud typed Predict: server CPU per request at 1 in flight", f"{fmt(fraud1, 3)} ms",
            f"≤ {FRAUD_SERIAL_MS} ms", None if fraud1 is None else fraud1 <= FRAUD_SERIAL_MS),
        row("1", "Envoy CPU per REST call (fraud, ~500 req/s open loop)", f"{fmt(rest, 3)} ms",
            f"≤ {ENVOY_REST_MS} ms", None if rest is None else rest <= ENVOY_REST_MS),
    ]


# ---------------------------------------------------------------- peer (item 5)

def peer_rows(peer: dict[str, Any]) -> list[dict[str, Any]]:
    """Item 5 from peer.json: fraud over OIP at 32 in flight, ≥ 3x MLServer's throughput at ≤ its p99."""
    for lv in peer.get("levels", []):
        if lv.get("mode") == "concurrency" and lv.get("value") == 32:
            ours, theirs = lv["ours"], lv["mlserver"]
            ratio = ours["rps"] / theirs["rps"] if theirs.get("rps") else None
            return [row("5", "fraud over OIP at 32 in flight vs MLServer: throughput",
                        f"{fmt(ratio, 2)}x ({ours['rps']:.0f} vs {theirs['rps']:.0f} req/s)", "≥ 3x",
                        None if ratio is None else ratio >= 3.0),
                    row("5", "fraud over OIP at 32 in flight vs MLServer: p99",
                        f"{ours['p99_ms']:.2f} vs {theirs['p99_ms']:.2f} ms", "≤ MLServer's",
                        ours["p99_ms"] <= theirs["p99_ms"])]
    return []
