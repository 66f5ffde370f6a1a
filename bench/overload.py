"""The `overload` scenario (issue 13, item 3): shed load instead of collapsing.

For each configured target (a model and a path, e.g. sentiment REST through the gateway: a model whose
capacity the generator can exceed fourfold on 2 cores), the capacity is measured by a short ramp (finer
steps upwards from this run's curve capacity when the curve ran, else configured rates); then the target is
offered 2x and 4x that capacity open loop, and a spike (half the capacity -> 4x -> half). Verdicts per run
(bench/verdicts.py): goodput ≥ 90 % of capacity, refusals answered with p99 < 20 ms, zero client-side
timeouts, no queue wait above the budget (the SLO; from the service's `inference_queue_wait_seconds`
histogram), latency back to normal within 2 s after the spike. The generator's timeout is generous (5 s),
so a server that queues requests into a timeout shows as timeouts, not as refusals. One plot per run shows
goodput, refusals, timeouts and latency over time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from bench import loadgen, verdicts
from bench.loadgen import Phase
from bench.stack import SLO_P99_MS, Sampler, Stack, histogram, log, observed, scrape_all
from bench.verdicts import fmt

matplotlib.use("Agg")
import matplotlib.pyplot as plt

QUEUE_WAIT = "inference_queue_wait_seconds"
BIN_S = 0.5


def curve_capacity(out: Path, model: str, path: str) -> float | None:
    """The capacity this run's curve found for model/path (a lower bound when it never broke), or None."""
    f = out / "curve.json"
    if not f.exists():
        return None
    cap = json.loads(f.read_text()).get("models", {}).get(model, {}).get(path, {}).get("capacity")
    return cap["rps"] if cap and cap["rps"] else None


def ramp_rates(curve_rps: float | None, configured: list[float], factors: tuple[float, ...]) -> list[float]:
    """The capacity ramp: finer steps from the curve's capacity upwards when the curve ran (its steps are
    coarse: a factor of 1.5 to 2), else the configured rates."""
    if curve_rps:
        return [round(curve_rps * f, 1) for f in factors]
    return list(configured)


def _run(stack: Stack, model: str, path: str, phases: list[Phase], tag: str, timeout_s: float
         ) -> tuple[loadgen.Result, dict[str, Any], list[dict[str, Any]]]:
    """One open-loop run of the target: its result, what the service observed (incl. queue-wait buckets), samples."""
    from bench.scenarios import _targets_for

    ports = stack.metrics_ports()
    peak = max(p.rate for p in phases)
    duration = sum(p.duration_s for p in phases)
    target = _targets_for(stack, model, path, peak, duration, tag)
    stack.wait_idle()
    before = scrape_all(ports)
    with Sampler({model: ports[model]}, stack.processes(), interval_s=0.25) as sampler:
        res = loadgen.run([target], phases, processes=loadgen.worker_processes(peak), timeout_s=timeout_s)
    after = scrape_all(ports)
    seen = observed(before, after, model)
    seen["queue_wait_over_budget"] = verdicts.queue_wait_over(
        histogram(before[model], QUEUE_WAIT, model), histogram(after[model], QUEUE_WAIT, model),
        SLO_P99_MS[model] / 1000)
    offset = res.start_wall - sampler.t0
    samples = [{"t": s["t"] - offset, "queue_depth": s["queue_depth"].get(model, 0.0)} for s in sampler.samples]
    return res, seen, samples


def ramp(stack: Stack, model: str, path: str, rates: list[float], step_s: float, timeout_s: float
         ) -> dict[str, Any]:
    """Rising rates until a step breaks its SLO (bench/verdicts.broken): the capacity and the steps. A warm-up at
    half the first rate comes first (not kept: a service's first seconds under load are slower); when even the
    first rate breaks, lower rates (0.85, 0.7, 0.5, 0.25 of it) are tried, highest first, before giving up."""
    _run(stack, model, path, [Phase(step_s, rates[0] / 2)], "ovl-warmup", timeout_s)
    steps: list[dict[str, Any]] = []

    def measure(rate: float) -> dict[str, Any]:
        res, _, _ = _run(stack, model, path, [Phase(step_s, rate)], f"ovl-ramp{int(rate)}", timeout_s)
        s = res.summary(slo_ms=SLO_P99_MS[model])
        s["offered_rate"] = rate
        s["broken"] = verdicts.broken(s, SLO_P99_MS[model])
        log(f"overload {model}/{path} ramp {rate:g}/s: achieved {s['achieved_rps']:.0f}, p99 {fmt(s['p99_ms'])} ms"
            + (f" -> broken ({s['broken']})" if s["broken"] else ""))
        return s

    for rate in rates:
        steps.append(measure(rate))
        if steps[-1]["broken"]:
            break
    if len(steps) == 1 and steps[0]["broken"]:
        for lower in (rates[0] * f for f in (0.85, 0.7, 0.5, 0.25)):
            steps.insert(0, measure(lower))
            if not steps[0]["broken"]:
                break
    return {"steps": steps, "capacity": verdicts.capacity(steps)}


def _plot(ax: Any, tl: list[dict[str, Any]], title: str, slo: float) -> None:
    """Offered, goodput, refusals, timeouts (req/s, left) and p99 latency (right) on one axes."""
    t = [b["t"] for b in tl]
    ax.plot(t, [b["offered_rps"] for b in tl], color="0.6", ls="--", label="offered/s")
    ax.plot(t, [b["goodput_rps"] for b in tl], color="tab:green", label="goodput/s (ok within SLO)")
    ax.plot(t, [b["refused_rps"] for b in tl], color="tab:orange", label="refusals/s")
    ax.plot(t, [b["timeouts_rps"] for b in tl], color="tab:red", label="timeouts/s")
    ax.plot(t, [b["failed_rps"] for b in tl], color="tab:purple", lw=0.8, label="other errors/s")
    ax.set(ylabel="req/s (answers by arrival)", title=title, xlabel="seconds from the start")
    right = ax.twinx()
    right.plot(t, [b["p99_ms"] if b["p99_ms"] is not None else np.nan for b in tl], color="k",
               label="p99 ms (every request, by send time)")
    right.axhline(slo, color="k", lw=0.6, ls=":", label="SLO")
    right.set(ylabel="latency ms", yscale="log")
    lines = ax.get_legend_handles_labels()
    rl = right.get_legend_handles_labels()
    ax.legend(lines[0] + rl[0], lines[1] + rl[1], fontsize=7, loc="upper right")


def overload(out: Path, stack: Stack, cfg: Any) -> dict[str, Any]:
    """2x and 4x capacity and a spike for each of `cfg.overload_targets`; writes overload.{json,md,png}."""
    from bench.scenarios import write

    targets: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for model, path in cfg.overload_targets:
        name, slo = f"{model}/{path}", SLO_P99_MS[model]
        from_curve = curve_capacity(out, model, path)
        r: dict[str, Any] = {"slo_p99_ms": slo}
        rates = ramp_rates(from_curve, cfg.overload_ramp[model], cfg.overload_ramp_factors)
        rp = ramp(stack, model, path, rates, cfg.overload_ramp_s, cfg.overload_timeout_s)
        r["ramp"] = rp["steps"]
        source = f"ramp from the curve's {from_curve:.0f}" if from_curve else "ramp"
        r["capacity"] = {**rp["capacity"], "source": source}
        cap = rp["capacity"]["rps"]
        if not cap:
            log(f"overload {name}: no step held the SLO, nothing to overload")
            r["skipped"] = "no capacity measured"
            targets[name] = r
            continue
        log(f"overload {name}: capacity {r['capacity']['text']} req/s ({r['capacity']['source']})")
        rows.append(verdicts.row("3", f"{name}: capacity (highest rate within the p99 SLO)",
                                 f"{r['capacity']['text']} req/s ({r['capacity']['source']})", "measured", None))
        runs = {}
        for mult in (2, 4):
            res, seen, samples = _run(stack, model, path, [Phase(cfg.overload_s, mult * cap)], f"ovl{mult}x",
                                      cfg.overload_timeout_s)
            s = res.summary(slo_ms=slo)
            runs[f"{mult}x"] = {"offered_rps": mult * cap, "summary": s, "service": seen, "samples": samples,
                                "timeline": res.timeline(BIN_S, slo), "generator_errors": res.errors}
            rows += verdicts.overload_rows(f"{name} at {mult}x capacity", s, cap, seen["queue_wait_over_budget"], slo,
                                           capacity_lower_bound=r["capacity"]["lower_bound"])
            log(f"overload {name} {mult}x ({mult * cap:.0f}/s): goodput {s['goodput_rps']:.0f}/s, refused "
                f"{s['refused']} (p99 {fmt(s['refusal_p99_ms'])} ms), timeouts {s['timeouts']}, p99 {fmt(s['p99_ms'])} "
                f"ms, queue waits over budget {seen['queue_wait_over_budget']}")
        n1, n2, n3 = cfg.overload_spike_s
        phases = [Phase(n1, cfg.overload_normal * cap), Phase(n2, 4 * cap), Phase(n3, cfg.overload_normal * cap)]
        res, seen, samples = _run(stack, model, path, phases, "ovl-spike", cfg.overload_timeout_s)
        tl = res.timeline(BIN_S, slo)
        normal = res.summary(window=(0.0, n1), slo_ms=slo)
        rec = verdicts.recovery_s(tl, n1 + n2, normal["p99_ms"], BIN_S)
        s = res.summary(slo_ms=slo)
        runs["spike"] = {"phases": [{"duration_s": p.duration_s, "rate": p.rate} for p in phases], "summary": s,
                         "normal_p99_ms": normal["p99_ms"], "recovery_s": rec, "service": seen, "samples": samples,
                         "timeline": tl, "generator_errors": res.errors,
                         "by_phase": [res.summary(window=(a, b), slo_ms=slo)
                                      for a, b in ((0, n1), (n1, n1 + n2), (n1 + n2, n1 + n2 + n3))]}
        rows += verdicts.overload_rows(f"{name} spike {cfg.overload_normal:g}x -> 4x -> {cfg.overload_normal:g}x", s,
                                       cap, seen["queue_wait_over_budget"], slo, recovery=rec, spike=True)
        log(f"overload {name} spike: refused {s['refused']}, timeouts {s['timeouts']}, recovery "
            f"{fmt(rec)} s after the spike (pre-spike p99 {fmt(normal['p99_ms'])} ms)")
        r["runs"] = runs
        targets[name] = r
    data = {"targets": rows, "by_target": targets, "bin_s": BIN_S, "timeout_s": cfg.overload_timeout_s,
            "met": verdicts.all_met([x for x in rows if x["met"] is not None]) if rows else False}
    md = ["## Overload: shedding at 2x and 4x capacity (issue 13, item 3)", "",
          "Each target alone, open loop: its capacity (the highest rate within the p99 SLO in a short ramp, "
          f"{cfg.overload_ramp_s:g} s a step, upwards from the curve's capacity when the curve ran), then 2x and "
          "4x that rate for "
          f"{cfg.overload_s:g} s each, then a spike ({cfg.overload_normal:g}x for {cfg.overload_spike_s[0]:g} s, "
          f"4x for {cfg.overload_spike_s[1]:g} s, {cfg.overload_normal:g}x for {cfg.overload_spike_s[2]:g} s). "
          f"The generator waits {cfg.overload_timeout_s:g} s before it gives up (a timeout). Goodput = ok "
          "answers within the SLO per second over the window in which answers arrived; refusals = "
          "`RESOURCE_EXHAUSTED` / `UNAVAILABLE` / HTTP 429 / 503; percentiles count every request. Queue waits "
          "above the budget (the SLO) from the service's `inference_queue_wait_seconds` histogram. \"Back to "
          "normal\": the first moment after the spike from which every half-second's p99 stays ≤ max(2x, +10 ms) the "
          "pre-spike p99 for 2 s.", "", *verdicts.targets_table(rows)]
    md += ["", "| target | run | offered/s | goodput/s | achieved/s | refused | refusal p99 ms | timeouts | "
           "other errors | p50 ms | p99 ms | ok p99 ms | queue waits > budget | service rejections |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in targets.items():
        for label, run in r.get("runs", {}).items():
            s, seen = run["summary"], run["service"]
            md.append(f"| {name} | {label} | {s['offered_rps']:.0f} | {s['goodput_rps']:.0f} | "
                      f"{s['achieved_rps']:.0f} | {s['refused']} | {fmt(s['refusal_p99_ms'])} | {s['timeouts']} | "
                      f"{s['failed'] + s['not_sent']} | {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} | "
                      f"{fmt(s['ok_p99_ms'])} | "
                      f"{fmt(seen['queue_wait_over_budget'], 0)} | {seen['rejected']:.0f} |")
        if r["capacity"].get("lower_bound"):
            md.append(f"\n{name}: the ramp never broke the SLO, so the capacity is a lower bound and \"2x\" / \"4x\" "
                      "may not overload the service.")
    plotted = [(name, label, run) for name, r in targets.items() for label, run in r.get("runs", {}).items()]
    if plotted:
        fig, axes = plt.subplots(len(plotted), 1, figsize=(10, 3.6 * len(plotted)), squeeze=False)
        for ax, (name, label, run) in zip(axes[:, 0], plotted, strict=True):
            _plot(ax, run["timeline"], f"{name}: {label}", targets[name]["slo_p99_ms"])
        fig.tight_layout()
        fig.savefig(out / "overload.png", dpi=100)
        plt.close(fig)
        md += ["", "![overload](overload.png)", ""]
    return write(out, "overload", data, md)
