"""The `make bench` scenarios 1-5. Each writes `<name>.json`, `<name>.md` and its PNG(s) into the run's
directory and returns its JSON. `quick=True` is the smoke variant (a few seconds each).

1 raw     each model's runtime in-process at batch 1/8/32 (and 256 for fraud): the ceiling.
2 curve   each service via typed gRPC (direct) and REST through the gateway, rising open-loop rate
          until p99 breaks the SLO: p50/p95/p99, achieved rate, errors, observed batch sizes, CPU.
3 mix     1000 req/s offered across the three models through the gateway (REST, ≥ 600 distinct
          standard keys), 60 s: met / not met against issue 13's item 4, p99 per model (every request),
          errors, each process's CPU per request against the cores; when not met, a ramp to the highest
          rate meeting every SLO and the goodput at twice that rate.
4 spike   10 → 1000 → 10 req/s (same mix and path): latency, queue depth, CPU and rejections over time.
5 cache   fraud with 30 % repeated transactions: hit rate and latency with Redis, with the in-process
          cache (no Redis) and with the cache off.

The other scenarios live in bench/cost.py (CPU per request against the gRPC floor) and bench/overload.py
(2x / 4x capacity and a spike); the verdicts in bench/verdicts.py. `Config` sizes them all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from bench import loadgen, verdicts
from bench.loadgen import Payloads, Phase, Target
from bench.stack import (
    MODELS,
    SLO_P99_MS,
    Sampler,
    Stack,
    cpu_delta,
    cpu_seconds,
    keys_for,
    log,
    observed,
    scrape_all,
    service,
    tokens,
)
from mlplatform.launch import RedisServer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MIX = {"fraud": 0.70, "sentiment": 0.20, "cnn": 0.10}
"""Share of each model in the aggregate mix and the spike (the issue's example)."""


@dataclass
class Config:
    """Sizes of every scenario: `full()` for `make bench`, `quick()` for the smoke test."""

    raw_seconds: float
    curve_rates: dict[str, list[float]]
    curve_step_s: float
    mix_rate: float
    mix_s: float
    spike: list[Phase]
    cache_rate: float
    cache_s: float
    cache_modes: tuple[str, ...]
    repeat_fraction: float = 0.30
    drain_s: float = 1.0
    mix_ramp: tuple[float, ...] = ()
    mix_ramp_s: float = 8.0
    cost_levels: tuple[tuple[int, int], ...] = ((16, 20_000), (1, 5_000))  # (in flight, calls) per probe
    cost_runtime_s: float = 0.5
    cost_idle_s: float = 2.0
    cost_gateway_rate: float = 500.0
    cost_gateway_s: float = 10.0
    overload_targets: tuple[tuple[str, str], ...] = (("sentiment", "rest"),)
    overload_ramp: dict[str, list[float]] = field(default_factory=lambda: {
        "fraud": [200, 400, 600, 800, 1000], "cnn": [50, 100, 200, 300, 450],
        "sentiment": [20, 40, 80, 120, 160, 200, 240, 280]})
    overload_ramp_s: float = 5.0
    overload_ramp_factors: tuple[float, ...] = (1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0)
    overload_s: float = 20.0
    overload_spike_s: tuple[float, float, float] = (10.0, 10.0, 15.0)
    overload_normal: float = 0.5
    overload_timeout_s: float = 5.0

    @staticmethod
    def full() -> Config:
        return Config(
            raw_seconds=1.5,
            curve_rates={"fraud": [100, 200, 400, 600, 800, 1000, 1300],
                         "cnn": [25, 50, 100, 200, 300, 450, 600],
                         "sentiment": [10, 20, 40, 80, 120, 160, 200, 260]},
            curve_step_s=8.0, mix_rate=1000.0, mix_s=60.0,
            spike=[Phase(20, 10), Phase(30, 1000), Phase(20, 10)],
            cache_rate=200.0, cache_s=10.0, cache_modes=("redis", "memory", "off"),
            mix_ramp=(150, 250, 350, 400, 450, 500, 600, 700, 850), mix_ramp_s=8.0)

    @staticmethod
    def quick() -> Config:
        return Config(
            raw_seconds=0.1,
            curve_rates={"fraud": [20, 40], "cnn": [10], "sentiment": [4]},
            curve_step_s=2.0, mix_rate=40.0, mix_s=3.0,
            spike=[Phase(2, 5), Phase(2, 40), Phase(2, 5)],
            cache_rate=40.0, cache_s=2.5, cache_modes=("redis", "off"), drain_s=0.2,
            mix_ramp=(20,), mix_ramp_s=1.5,
            cost_levels=((16, 400), (1, 100)), cost_runtime_s=0.1, cost_idle_s=0.3, cost_gateway_rate=40.0,
            cost_gateway_s=1.5,
            overload_ramp={"sentiment": [4, 8], "fraud": [20, 40], "cnn": [10, 20]}, overload_ramp_s=1.5,
            overload_ramp_factors=(1.0, 1.5), overload_s=2.0, overload_spike_s=(1.5, 1.5, 2.0))


def write(out: Path, name: str, data: dict[str, Any], md: list[str]) -> dict[str, Any]:
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    log(f"{name}: wrote {out / (name + '.md')}")
    return data


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------- 1 raw

def raw(out: Path, repository: Path, cfg: Config) -> dict[str, Any]:
    """Each model's runtime in-process (the service's model class, its config's threads), by batch size."""
    from cnn_service.model import CnnModel
    from fraud_service.model import FraudModel
    from mlplatform.repository import ModelRepository
    from sentiment_service.model import SentimentModel

    repo = ModelRepository(repository)
    heldout = np.load(repository / "cnn" / "1" / "heldout.npz")["images"].astype(np.float32)
    texts = loadgen.load_inputs("sentiment", 512, seed=0)
    fraud_rows = np.asarray(loadgen.load_inputs("fraud", 4096, seed=0), dtype=np.float32)
    def window(items: Any, b: int, i: int) -> Any:  # call i's batch: rotates through the inputs
        start = (i * b) % max(1, len(items) - b + 1)
        return items[start:start + b]

    cases = {
        "fraud": (FraudModel, (1, 8, 32, 256), lambda b, i: {"features": window(fraud_rows, b, i)}),
        "cnn": (CnnModel, (1, 8, 32), lambda b, i: {"image": window(heldout, b, i)[:, None]}),
        "sentiment": (SentimentModel, (1, 8, 32),
                      lambda b, i: {"text": np.array([t.encode() for t in window(texts, b, i)], dtype=object)}),
    }
    results: dict[str, Any] = {}
    for name, (cls, batches, make) in cases.items():
        model = cls(repo.resolve(name))
        model._load()
        rows = {}
        for b in batches:
            inputs = [make(b, i) for i in range(16)]  # built before timing; sentiment texts of varied length
            model.infer(inputs[0])
            times: list[float] = []
            t_end = time.perf_counter() + cfg.raw_seconds
            cpu0 = time.process_time()
            while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 2000):
                x = inputs[len(times) % len(inputs)]
                t0 = time.perf_counter()
                model.infer(x)
                times.append(time.perf_counter() - t0)
            cpu_per_call = (time.process_time() - cpu0) / len(times)
            ms = np.asarray(times) * 1000
            p50 = float(np.percentile(ms, 50))
            rows[str(b)] = {"p50_ms": p50, "p99_ms": float(np.percentile(ms, 99)), "calls": len(times),
                            "rows_per_s": b / (p50 / 1000), "cpu_ms_per_call": cpu_per_call * 1000,
                            "rows_per_core_s": b / cpu_per_call if cpu_per_call > 0 else None}
            log(f"raw {name} batch {b}: p50 {p50:.3f} ms, {rows[str(b)]['rows_per_s']:.0f} rows/s")
        results[name] = {"providers": list(getattr(model, "providers", [])),
                         "variant": getattr(model, "runtime_name", None),  # runtime variant served (sentiment: auto)
                         "threads": model.config.runtime.intra_op_threads, "batches": rows}
    md = ["## 1. Raw runtime baseline (in-process)", "",
          "The service's own model class called directly (pre/post-processing included: sentiment "
          "tokenises, cnn takes pixel tensors), its config's thread count, no gRPC, no batcher. "
          "rows/s = batch / p50; CPU ms per call = process CPU time / calls (all runtime threads); rows per "
          "core-second = batch / CPU per call. This is the ceiling the served numbers are compared with. "
          "Runtime variants served: " + ", ".join(f"{n} `{r['variant']}`" for n, r in results.items()
                                                  if r["variant"]) + ".", "",
          "| model | threads | batch | p50 ms | p99 ms | rows/s | CPU ms/call | rows/core-s | calls |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for b, row in r["batches"].items():
            md.append(f"| {name} | {r['threads']} | {b} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                      f"{row['rows_per_s']:,.0f} | {row['cpu_ms_per_call']:.3f} | {row['rows_per_core_s']:,.0f} | "
                      f"{row['calls']} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        bs = [int(b) for b in r["batches"]]
        ax.plot(bs, [r["batches"][str(b)]["rows_per_s"] for b in bs], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="rows/s (p50)", title="Raw runtime throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "raw.png", dpi=110)
    plt.close(fig)
    md += ["", "![raw](raw.png)", ""]
    return write(out, "raw", {"models": results}, md)


# ---------------------------------------------------------------- 2 curve

def _targets_for(stack: Stack, model: str, path: str, rate: float, duration_s: float, tag: str,
                 weight: float = 1.0, payloads: Payloads | None = None) -> Target:
    if path == "grpc":
        return Target(model, "grpc", stack.services[model].target, weight=weight, payloads=payloads)
    toks = tokens(keys_for(rate, duration_s), f"{tag}-{model}")
    return Target(model, "rest", stack.gateway.target, toks, weight=weight, payloads=payloads)


def _generator_note(s: dict[str, Any], slo: float) -> str:
    """' (generator behind schedule)' when the load generator's own send lag is a fifth of the SLO or more:
    the latencies are still honest (measured from the intended time) but the client shares the CPU."""
    lag = s.get("send_lag_p99_ms")
    return f"; generator behind schedule (send lag p99 {lag:.0f} ms)" if lag is not None and lag >= slo / 5 else ""


def curve(out: Path, stack: Stack, cfg: Config) -> dict[str, Any]:
    """Rising constant rates per model and path until p99 breaks the SLO (that step is kept, then stop)."""
    ports = stack.metrics_ports()
    results: dict[str, Any] = {}
    with Sampler(ports, stack.processes()) as sampler:
        for model in MODELS:
            for path in ("grpc", "rest"):
                stack.wait_idle()  # the previous ramp's overload must not leak into this one
                steps = []
                for rate in cfg.curve_rates[model]:
                    target = _targets_for(stack, model, path, rate, cfg.curve_step_s, f"curve{int(rate)}")
                    before = scrape_all(ports)
                    res = loadgen.run([target], [Phase(cfg.curve_step_s, rate)],
                                      processes=loadgen.worker_processes(rate))
                    after = scrape_all(ports)
                    s = res.summary(slo_ms=SLO_P99_MS[model])
                    s["offered_rate"] = rate
                    s["service"] = observed(before, after, model)
                    s["cpu_pct"] = sampler.cpu_means(res.start_wall - sampler.t0,
                                                     res.start_wall - sampler.t0 + cfg.curve_step_s)
                    s["generator_errors"] = res.errors
                    s["broken"] = verdicts.broken(s, SLO_P99_MS[model])
                    if s["broken"]:
                        s["broken"] += _generator_note(s, SLO_P99_MS[model])
                    steps.append(s)
                    log(f"curve {model}/{path} {rate:g} req/s: achieved {s['achieved_rps']:.0f}, "
                        f"p50 {fmt(s['p50_ms'])} p99 {fmt(s['p99_ms'])} ms, errors {s['error_count']}, "
                        f"mean batch {s['service']['mean_batch']:.1f}, send lag p99 {fmt(s['send_lag_p99_ms'])} ms"
                        + (f" -> SLO broken ({s['broken']})" if s["broken"] else ""))
                    time.sleep(cfg.drain_s)  # let queues drain between steps
                    if s["broken"]:
                        break
                ok = [st for st in steps if not st["broken"]]
                best = max(ok, key=lambda st: st["achieved_rps"]) if ok else None
                cap = verdicts.capacity(steps)
                results.setdefault(model, {})[path] = {"steps": steps, "slo_p99_ms": SLO_P99_MS[model],
                                                       "max_rps_within_slo": cap["rps"], "capacity": cap,
                                                       "at_slo": best}
    md = ["## 2. Per-model latency curve (open loop)", "",
          f"Each service alone, constant offered rate for {cfg.curve_step_s:g} s per step, rising until p99 breaks "
          "the SLO (or more than 1 % of requests not ok, or achieved < 90 % of offered); that step is shown and the "
          "ramp stops. Percentiles count **every** request (a timeout or refusal at its full wait; one never sent at "
          "the timeout); achieved = ok answers per second over the window in which they arrived. "
          "**grpc** = typed `Predict` straight to the service; **rest** = `POST /api/v1/<model>` through Envoy "
          "(JWT, per-key rate limit with enough distinct standard keys, transcoding). Latency from the intended "
          "send time. Cache off. Batches from the service's `inference_batch_size` histogram; CPU = mean % of one "
          "core per process during the step.", "",
          "| model | path | offered/s | achieved/s | p50 ms | p95 ms | p99 ms | errors | mean batch | "
          "gen. lag p99 ms | CPU service / envoy / loadgen / machine % | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, paths in results.items():
        for path, r in paths.items():
            for s in r["steps"]:
                cpu = s["cpu_pct"]
                md.append(f"| {model} | {path} | {s['offered_rate']:g} | {s['achieved_rps']:.0f} | "
                          f"{fmt(s['p50_ms'])} | "
                          f"{fmt(s['p95_ms'])} | {fmt(s['p99_ms'])} | {s['error_count']} | "
                          f"{s['service']['mean_batch']:.1f} | {fmt(s['send_lag_p99_ms'])} | "
                          f"{cpu.get(model, 0):.0f} / {cpu.get('envoy', 0):.0f} / {cpu.get('loadgen', 0):.0f} / "
                          f"{cpu.get('machine', 0):.0f} | "
                          f"{s['broken'] or 'within SLO'} |")
    md += ["", "Highest achieved rate within the p99 SLO (\"≥\": the ramp's top step still held it, so the "
           "capacity is higher than measured):", "",
           "| model | SLO p99 ms | grpc req/s | rest req/s |", "|---|---|---|---|"]
    for model, paths in results.items():
        md.append(f"| {model} | {SLO_P99_MS[model]:.0f} | {paths['grpc']['capacity']['text']} | "
                  f"{paths['rest']['capacity']['text']} |")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (model, paths) in zip(axes, results.items(), strict=False):
        for path, style in (("grpc", "-"), ("rest", "--")):
            steps = paths[path]["steps"]
            x = [s["offered_rate"] for s in steps]
            for q, color in (("p50_ms", "tab:green"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red")):
                ax.plot(x, [s[q] if s[q] is not None else np.nan for s in steps], style, marker="o", color=color,
                        label=f"{path} {q[:3]}")
        ax.axhline(SLO_P99_MS[model], color="k", lw=0.8, ls=":", label="p99 SLO")
        ax.set(title=model, xlabel="offered req/s", ylabel="latency ms", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)
    md += ["", "![curve](curve.png)", ""]
    return write(out, "curve", {"models": results, "step_s": cfg.curve_step_s}, md)


# ---------------------------------------------------------------- 3 mix and 4 spike

def _mix_targets(stack: Stack, rate: float, duration_s: float, tag: str) -> tuple[list[Target], int]:
    n_keys = keys_for(rate, duration_s)
    toks = tokens(n_keys, tag)
    return [Target(m, "rest", stack.gateway.target, toks, weight=w) for m, w in MIX.items()], n_keys


def _limiting(cpu: dict[str, float]) -> str:
    """The busiest process by mean CPU (% of one core) and the machine total."""
    procs = {k: v for k, v in cpu.items() if k != "machine"}
    if not procs:
        return "no CPU samples"
    top = max(procs, key=procs.get)
    ours = sum(procs.values())
    machine = cpu.get("machine", ours)
    return (f"busiest process: {top} at {procs[top]:.0f} % of a core; the bench's processes together {ours:.0f} %, "
            f"the whole machine {machine:.0f} % of {os_cpus() * 100} % (other users: {max(0.0, machine - ours):.0f} %)")


def os_cpus() -> int:
    import os

    return os.cpu_count() or 1


def cpu_budget(cpu_s: dict[str, float], requests: int, per_model_requests: dict[str, int], offered_rps: float,
               cores: int) -> dict[str, Any]:
    """Each process's CPU per request against the machine: core-seconds / requests (ms), and its share of the
    budget `cores` / `offered_rps` (every request may cost at most that much CPU, all processes together)."""
    budget_ms = 1000 * cores / offered_rps if offered_rps else None
    rows = {}
    for role, secs in sorted(cpu_s.items(), key=lambda kv: -kv[1]):
        ms = 1000 * secs / requests if requests else None
        own = per_model_requests.get(role)
        rows[role] = {"cpu_s": secs, "ms_per_request": ms,
                      "ms_per_own_request": 1000 * secs / own if own else None,
                      "budget_share": ms / budget_ms if ms is not None and budget_ms else None}
    total_ms = sum(r["ms_per_request"] or 0.0 for r in rows.values())
    return {"cores": cores, "offered_rps": offered_rps, "requests": requests, "budget_ms_per_request": budget_ms,
            "total_ms_per_request": total_ms, "max_rps_on_cores": 1000 * cores / total_ms if total_ms else None,
            "processes": rows}


def _mix_run(stack: Stack, rate: float, duration_s: float, tag: str) -> tuple[loadgen.Result, list[Target], int,
                                                                            dict[str, float], dict[str, Any]]:
    """One mix run: the result, its targets, the key count, each process's CPU seconds during it (the generator's
    workers as `loadgen`) and what the services observed."""
    ports, pids = stack.metrics_ports(), stack.processes()
    targets, n_keys = _mix_targets(stack, rate, duration_s, tag)
    before = scrape_all(ports)
    cpu0: dict[str, float] = {}
    res = loadgen.run(targets, [Phase(duration_s, rate)], processes=loadgen.worker_processes(rate),
                      on_start=lambda: cpu0.update(cpu_seconds(pids)))
    cpu = cpu_delta(cpu0, cpu_seconds(pids))
    cpu["loadgen"] = res.generator_cpu_s
    after = scrape_all(ports)
    return res, targets, n_keys, cpu, {m: observed(before, after, m) for m in MIX}


def _mix_goodput(res: loadgen.Result, targets: list[Target]) -> float:
    """Answers ok within their own model's SLO, per second (each model's completion window)."""
    return sum(res.summary(t.name, slo_ms=SLO_P99_MS[t.model])["goodput_rps"] for t in targets)


def mix(out: Path, stack: Stack, cfg: Config) -> dict[str, Any]:
    """`cfg.mix_rate` req/s across the models (MIX) through the gateway, REST, distinct standard keys; met / not
    met against item 4 of issue 13, each process's CPU per request against the cores, and when not met the
    highest mix rate that meets every SLO (a short ramp) and the goodput at twice that rate."""
    ports = stack.metrics_ports()
    with Sampler(ports, stack.processes()) as sampler:
        res, targets, n_keys, cpu_s, seen = _mix_run(stack, cfg.mix_rate, cfg.mix_s, "mix")
    cpu = sampler.cpu_means(res.start_wall - sampler.t0, res.start_wall - sampler.t0 + cfg.mix_s)
    per_model = {}
    for t in targets:
        s = res.summary(t.name, slo_ms=SLO_P99_MS[t.model])
        s["slo_p99_ms"] = SLO_P99_MS[t.model]
        s["slo_met"] = bool(s["p99_ms"] is not None and s["p99_ms"] <= SLO_P99_MS[t.model] and s["error_count"] == 0)
        s["service"] = seen[t.model]
        per_model[t.model] = s
    overall = res.summary()
    targets_rows = verdicts.mix_rows(cfg.mix_rate, overall, per_model, SLO_P99_MS)
    met = verdicts.all_met(targets_rows)
    answered = overall["requests"] - overall["not_sent"]
    budget = cpu_budget(cpu_s, answered, {m: s["requests"] - s["not_sent"] for m, s in per_model.items()},
                        cfg.mix_rate, os_cpus())
    gen_ms = budget["processes"].get("loadgen", {}).get("ms_per_request")
    targets_rows.append(verdicts.row("4", "mix: load generator CPU per request (part of the budget)",
                                     f"{verdicts.fmt(gen_ms, 3)} ms", "reported", None))
    ramp: dict[str, Any] | None = None
    if not met and cfg.mix_ramp:
        ramp = _mix_ramp(stack, cfg)
        best = ramp["best_rps"]
        targets_rows.append(verdicts.row("4", "mix: highest rate meeting every SLO (ramp)",
                                         f"{best:g} req/s" if best else "none of the steps",
                                         f"{cfg.mix_rate:g} req/s", bool(best and best >= cfg.mix_rate)))
        if ramp.get("double"):
            d = ramp["double"]
            targets_rows.append(verdicts.row("4", f"mix: goodput at 2x that rate ({d['offered_rps']:g} req/s)",
                                             f"{d['goodput_rps']:.0f} req/s", f"≥ {0.9 * best:.0f} req/s",
                                             d["goodput_rps"] >= 0.9 * best))
    data = {"offered_rps": cfg.mix_rate, "duration_s": cfg.mix_s, "mix": MIX, "keys": n_keys, "overall": overall,
            "models": per_model, "cpu_pct": cpu, "met": met, "limiting": _limiting(cpu) if cpu else "no CPU samples",
            "cpu_budget": budget, "ramp": ramp, "targets": targets_rows, "generator_errors": res.errors}
    log(f"mix: offered {cfg.mix_rate:g}/s, achieved {overall['achieved_rps']:.0f}/s, "
        f"errors {overall['error_count']}, met={met}; CPU {budget['total_ms_per_request']:.2f} ms per request of a "
        f"{budget['budget_ms_per_request']:.2f} ms budget; generator {verdicts.fmt(gen_ms, 3)} ms per request")
    md = ["## 3. Aggregate mix through the gateway", "",
          f"{cfg.mix_rate:g} req/s offered for {cfg.mix_s:g} s, open loop, REST through Envoy; mix "
          + ", ".join(f"{m} {w:.0%}" for m, w in MIX.items())
          + f" (each arrival's model drawn at random with these weights); {n_keys} distinct standard-tier API keys "
          "rotated round-robin (100 req/min per key). Cache off. Percentiles count every request (timeouts and "
          "refusals at their full wait); achieved = ok answers per second over the window in which they arrived.", "",
          f"**Overall:** achieved {overall['achieved_rps']:.0f} req/s of {overall['offered_rps']:.0f} offered; "
          f"errors {overall['error_count']} {overall['errors'] or ''}; generator send lag p99 "
          f"{fmt(overall['send_lag_p99_ms'])} ms. **Targets (issue 13, item 4): "
          f"{'met' if met else 'not met'}.**", "", *verdicts.targets_table(targets_rows)]
    md += ["", "| model | offered/s | achieved/s | goodput/s | p50 ms | p95 ms | p99 ms | ok p99 ms | SLO p99 ms | "
           "met | errors | mean batch | mean queue wait ms | queue-full rejections |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in per_model.items():
        md.append(f"| {m} | {s['offered_rps']:.0f} | {s['achieved_rps']:.0f} | {s['goodput_rps']:.0f} | "
                  f"{fmt(s['p50_ms'])} | {fmt(s['p95_ms'])} | {fmt(s['p99_ms'])} | {fmt(s['ok_p99_ms'])} | "
                  f"{s['slo_p99_ms']:.0f} | {'yes' if s['slo_met'] else 'no'} | "
                  f"{s['error_count']} {s['errors'] or ''} | {s['service']['mean_batch']:.1f} | "
                  f"{fmt(s['service']['mean_queue_wait_ms'])} | {s['service']['rejected']:.0f} |")
    md += ["", f"**CPU per request against {budget['cores']} cores** (each process's CPU core-seconds from the "
           "start of the schedule to the last answer ÷ requests answered; the generator's worker processes measure "
           f"their own). At {cfg.mix_rate:g} req/s the machine allows "
           f"{fmt(budget['budget_ms_per_request'], 2)} ms of CPU per request, all processes together; they used "
           f"{fmt(budget['total_ms_per_request'], 2)} ms, i.e. these {budget['cores']} cores could carry about "
           f"{fmt(budget['max_rps_on_cores'], 0)} req/s of this mix.", "",
           "| process | CPU s | ms per mix request | ms per own request | share of the budget |",
           "|---|---|---|---|---|"]
    for role, r in budget["processes"].items():
        md.append(f"| {role} | {r['cpu_s']:.1f} | {fmt(r['ms_per_request'], 3)} | {fmt(r['ms_per_own_request'], 3)} "
                  f"| {fmt(None if r['budget_share'] is None else 100 * r['budget_share'], 0)} % |")
    if ramp:
        md += ["", "**Ramp** (not met at the full rate): the mix at rising rates, "
               f"{cfg.mix_ramp_s:g} s each, until a model's p99 breaks its SLO or anything fails:", "",
               "| offered/s | achieved/s | goodput/s | " + " | ".join(f"{m} p99 ms" for m in MIX)
               + " | errors | verdict |",
               "|---|---|---|" + "---|" * len(MIX) + "---|---|"]
        for st in ramp["steps"]:
            md.append(f"| {st['offered_rps']:g} | {st['achieved_rps']:.0f} | {st['goodput_rps']:.0f} | "
                      + " | ".join(fmt(st["p99_ms"].get(m)) for m in MIX)
                      + f" | {st['error_count']} | {'meets every SLO' if st['met'] else 'broken'} |")
    md += ["", "Mean CPU during the run (% of one core): "
           + (", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])) or "no samples") + ".",
           f"Limiting resource: {data['limiting']}.", ""]
    return write(out, "mix", data, md)


def _mix_ramp(stack: Stack, cfg: Config) -> dict[str, Any]:
    """The mix at `cfg.mix_ramp` rates until one breaks (a model's p99 above its SLO, errors, or achieved below
    99 % of offered); then the goodput at twice the highest rate that held."""
    steps, best = [], 0.0
    for rate in cfg.mix_ramp:
        stack.wait_idle()
        res, targets, _, _, _ = _mix_run(stack, rate, cfg.mix_ramp_s, f"ramp{int(rate)}")
        per = {t.model: res.summary(t.name, slo_ms=SLO_P99_MS[t.model]) for t in targets}
        overall = res.summary()
        ok = verdicts.all_met(verdicts.mix_rows(rate, overall, per, SLO_P99_MS))
        steps.append({"offered_rps": rate, "achieved_rps": overall["achieved_rps"],
                      "goodput_rps": _mix_goodput(res, targets), "p99_ms": {m: s["p99_ms"] for m, s in per.items()},
                      "error_count": overall["error_count"], "errors": overall["errors"], "met": ok})
        log(f"mix ramp {rate:g}/s: achieved {overall['achieved_rps']:.0f}, p99 "
            + ", ".join(f"{m} {fmt(s['p99_ms'])}" for m, s in per.items())
            + f" ms, errors {overall['errors'] or 'none'} -> {'ok' if ok else 'broken'}")
        if not ok:
            break
        best = rate
    out: dict[str, Any] = {"steps": steps, "best_rps": best, "step_s": cfg.mix_ramp_s}
    if best:
        stack.wait_idle()
        res, targets, _, _, _ = _mix_run(stack, 2 * best, cfg.mix_ramp_s, "ramp2x")
        overall = res.summary()
        out["double"] = {"offered_rps": 2 * best, "goodput_rps": _mix_goodput(res, targets),
                         "achieved_rps": overall["achieved_rps"], "errors": overall["errors"],
                         "p99_ms": overall["p99_ms"]}
        log(f"mix at 2x {best:g}/s: goodput {out['double']['goodput_rps']:.0f}/s, errors {overall['errors']}")
    return out


def spike(out: Path, stack: Stack, cfg: Config) -> dict[str, Any]:
    """Low → high → low offered rate (same mix and path as `mix`): per-second latency, queue depth, CPU."""
    ports = stack.metrics_ports()
    peak = max(p.rate for p in cfg.spike)
    duration = sum(p.duration_s for p in cfg.spike)
    targets, n_keys = _mix_targets(stack, peak, duration, "spike")
    before = scrape_all(ports)
    with Sampler(ports, stack.processes(), interval_s=0.25) as sampler:
        res = loadgen.run(targets, cfg.spike, processes=loadgen.worker_processes(peak))
        time.sleep(0.5)
    after = scrape_all(ports)
    offset = res.start_wall - sampler.t0
    samples = [{**s, "t": s["t"] - offset} for s in sampler.samples]
    phases, t0 = [], 0.0
    for p in cfg.spike:
        s = res.summary(window=(t0, t0 + p.duration_s))
        s.update(rate=p.rate, t_from=t0, t_to=t0 + p.duration_s)
        phases.append(s)
        t0 += p.duration_s
    total_req = len(res.intended)
    answered = int(np.isfinite(res.end).sum())
    dropped = int((res.status == loadgen.DROPPED).sum())
    rejected = {m: observed(before, after, m)["rejected"] for m in MIX}
    overall = res.summary()
    data = {"phases": [{"duration_s": p.duration_s, "rate": p.rate} for p in cfg.spike], "keys": n_keys,
            "mix": MIX, "overall": overall, "by_phase": phases, "timeline": res.timeline(1.0),
            "per_model": {t.model: res.summary(t.name, slo_ms=SLO_P99_MS[t.model]) for t in targets},
            "samples": samples, "requests": total_req, "answered": answered, "not_sent": dropped,
            "lost": total_req - answered - dropped, "queue_full_rejections": rejected,
            "max_queue_depth": {m: max((s["queue_depth"].get(m, 0) for s in samples), default=0) for m in MIX},
            "generator_errors": res.errors}
    log(f"spike: {total_req} requests, {answered} answered, errors {overall['errors']}, "
        f"queue-full rejections {rejected}, max queue depth {data['max_queue_depth']}")
    md = ["## 4. Spike", "",
          "Offered " + " → ".join(f"{p.rate:g} req/s for {p.duration_s:g} s" for p in cfg.spike)
          + f", same mix and path as the aggregate run (REST through Envoy, {n_keys} keys). Every request has an "
          "outcome: an answer (ok or an error status) or, if the generator had too many outstanding, `dropped` "
          "(counted, never hidden).", "",
          f"Requests {total_req}; answered {answered} (ok {overall['ok']}); errors {overall['errors'] or 'none'}; "
          f"not sent by the generator {dropped}; **lost (no outcome) {data['lost']}**. Queue-full rejections counted "
          f"by the services (`inference_rejected_total`): {rejected}. Max queue depth sampled every 0.25 s: "
          f"{data['max_queue_depth']}.", "",
          "Percentiles count every request; achieved = ok answers per second over the window in which the "
          "phase's answers arrived.", "",
          "| phase | offered/s | achieved/s | p50 ms | p95 ms | p99 ms | refused | timeouts | other errors | "
          "gen. lag p99 ms |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        md.append(f"| {p['t_from']:g}-{p['t_to']:g} s | {p['offered_rps']:.0f} | {p['achieved_rps']:.0f} | "
                  f"{fmt(p['p50_ms'])} | {fmt(p['p95_ms'])} | {fmt(p['p99_ms'])} | {p['refused']} | "
                  f"{p['timeouts']} | {p['failed'] + p['not_sent']} | "
                  f"{fmt(p['send_lag_p99_ms'])} |")
    tl = data["timeline"]
    fig, (a1, a2, a3, a4) = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    t = [r["t"] for r in tl]
    a1.plot(t, [r["offered_rps"] for r in tl], label="offered req/s")
    a1.plot(t, [r["achieved_rps"] for r in tl], label="ok answers/s")
    a1.plot(t, [r["refused_rps"] for r in tl], label="refusals/s")
    a1.plot(t, [r["timeouts_rps"] for r in tl], label="timeouts/s")
    a1.plot(t, [r["failed_rps"] for r in tl], label="other errors/s")
    a1.set(ylabel="req/s")
    a1.legend(fontsize=8)
    a2.plot(t, [r["p50_ms"] if r["p50_ms"] is not None else np.nan for r in tl], label="p50")
    a2.plot(t, [r["p99_ms"] if r["p99_ms"] is not None else np.nan for r in tl], label="p99")
    a2.set(ylabel="latency ms (by intended send second)", yscale="log")
    a2.legend(fontsize=8)
    ts = [s["t"] for s in samples]
    for m in MIX:
        a3.plot(ts, [s["queue_depth"].get(m, 0) for s in samples], label=f"{m} queue depth")
    a3.set(ylabel="requests queued")
    a3.legend(fontsize=8)
    for role in (samples[0]["cpu"] if samples else {}):
        a4.plot(ts, [s["cpu"].get(role, 0) for s in samples], label=role)
    a4.plot(ts, [s.get("machine_cpu", 0) for s in samples], "k--", label="machine (all users)")
    a4.set(ylabel="CPU % of one core", xlabel="seconds from the start of the schedule")
    a4.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "spike.png", dpi=110)
    plt.close(fig)
    md += ["", "![spike](spike.png)", ""]
    return write(out, "spike", data, md)


# ---------------------------------------------------------------- 5 cache

def cache(out: Path, repository: Path, cfg: Config) -> dict[str, Any]:
    """Fraud alone, gRPC direct, `repeat_fraction` of transactions repeated: Redis vs in-process vs no cache."""
    results = {}
    for mode in cfg.cache_modes:
        redis = RedisServer().start() if mode == "redis" else None
        svc = service("fraud", repository, redis_url=redis.url if redis else None, cache=mode != "off")
        try:
            payloads = Payloads("fraud", repeat_fraction=cfg.repeat_fraction, seed=7)
            target = Target("fraud", "grpc", svc.target, payloads=payloads)
            ports = {"fraud": svc.metrics_port}
            before = scrape_all(ports)
            res = loadgen.run([target], [Phase(cfg.cache_s, cfg.cache_rate)],
                              processes=loadgen.worker_processes(cfg.cache_rate))
            after = scrape_all(ports)
        finally:
            svc.stop()
            if redis:
                redis.stop()
        s = res.summary()
        s["service"] = observed(before, after, "fraud")
        results[mode] = s
        log(f"cache {mode}: hit rate {fmt(s['service']['cache_hit_rate'], 3)}, p50 {fmt(s['p50_ms'], 2)} "
            f"p99 {fmt(s['p99_ms'], 2)} ms, errors {s['error_count']}")
    md = ["## 5. Prediction cache", "",
          f"Fraud alone, typed gRPC straight to the service, {cfg.cache_rate:g} req/s open loop for {cfg.cache_s:g} s; "
          f"each request repeats an earlier transaction with probability {cfg.repeat_fraction:.0%} (a returning "
          "user), otherwise sends a new one. **redis**: the shared Redis cache (`REDIS_URL`); **memory**: no Redis, "
          "the in-process LRU; **off**: `FRAUD_CACHE_ENABLED=false`. Hit rate from `inference_cache_total`.", "",
          "| cache | hit rate | p50 ms | p95 ms | p99 ms | achieved/s | errors | rows the model ran |",
          "|---|---|---|---|---|---|---|---|"]
    for mode, s in results.items():
        md.append(f"| {mode} | {fmt(s['service']['cache_hit_rate'], 3)} | {fmt(s['p50_ms'], 2)} | "
                  f"{fmt(s['p95_ms'], 2)} | {fmt(s['p99_ms'], 2)} | {s['achieved_rps']:.0f} | {s['error_count']} | "
                  f"{s['service']['rows']:.0f} |")
    cards = card_cache(cfg, repository)
    md += ["", "### Repeat customers (scoring by card_id)", "",
           f"Fraud scored by `card_id` (online features from Redis, {loadgen.CARDS} materialised cards), typed gRPC "
           f"straight to the service, {cfg.cache_rate:g} req/s for {cfg.cache_s:g} s. Customers are drawn from a Zipf "
           f"law (p ~ 1/rank^{loadgen.ZIPF_S}); {loadgen.HABIT_SHARE:.0%} of a card's transactions are one of its "
           f"{loadgen.HABITS} recurring ones (same amount, merchant, place, channel), the rest new. A repeat is the "
           "same card with the same transaction fields within the cache TTL (`fraud_service.online.repeat_key`); "
           "the feature read happens either way (the card's aggregates are fresh), the cache saves the model's "
           "queue and inference. Feature read p50/p99 from the service's `feature_store_read_duration_seconds`.",
           "", "| cache | hit rate | p50 ms | p95 ms | p99 ms | mean ms | errors | rows the model ran | "
           "feature read p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in cards.items():
        md.append(f"| {mode} | {fmt(s['service']['cache_hit_rate'], 3)} | {fmt(s['p50_ms'], 2)} | "
                  f"{fmt(s['p95_ms'], 2)} | {fmt(s['p99_ms'], 2)} | {fmt(s.get('mean_ms'), 2)} | {s['error_count']} | "
                  f"{s['service']['rows']:.0f} | {fmt(s['feature_read_p50_ms'], 2)} / "
                  f"{fmt(s['feature_read_p99_ms'], 2)} |")
    if {"on", "off"} <= cards.keys() and cards["on"]["p50_ms"] is not None and cards["off"]["p50_ms"] is not None:
        saved = {q: cards["off"][q] - cards["on"][q] for q in ("p50_ms", "p95_ms", "p99_ms")
                 if cards["on"][q] is not None and cards["off"][q] is not None}
        md += ["", "Latency saved by the cache (off - on): " +
               ", ".join(f"{q[:3]} {v:+.2f} ms" for q, v in saved.items()) +
               f"; model rows saved: {cards['off']['service']['rows'] - cards['on']['service']['rows']:.0f}."]
    probe = cards.get("on", {}).get("probe")
    if probe and "hit_p50_ms" in probe and "miss_p50_ms" in probe:
        md += ["", f"Sequential probe ({probe['calls']} calls, one at a time, `cached` read from each answer): "
               f"{probe['hits']} hits p50 {probe['hit_p50_ms']:.2f} ms / p99 {probe['hit_p99_ms']:.2f} ms, "
               f"{probe['misses']} misses p50 {probe['miss_p50_ms']:.2f} ms / p99 {probe['miss_p99_ms']:.2f} ms: "
               f"a hit saves {probe['miss_p50_ms'] - probe['hit_p50_ms']:+.2f} ms at p50."]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    modes = list(results)
    xs = np.arange(len(modes))
    for i, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        ax.bar(xs + (i - 1) * 0.25, [results[m][q] or 0 for m in modes], width=0.25, label=q[:3])
    ax.set_xticks(xs, modes)
    ax.set(ylabel="latency ms", title=f"fraud, {cfg.repeat_fraction:.0%} repeats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cache.png", dpi=110)
    plt.close(fig)
    md += ["", "![cache](cache.png)", ""]
    return write(out, "cache", {"repeat_fraction": cfg.repeat_fraction, "rate": cfg.cache_rate,
                                "duration_s": cfg.cache_s, "modes": results, "cards": cards}, md)


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """The q-quantile (ms) of a Prometheus histogram's growth between two scrapes, interpolated in its bucket."""
    def buckets(m: dict[str, float]) -> dict[float, float]:
        out = {}
        for key, v in m.items():
            if key.startswith(name + "_bucket{"):
                le = key.split('le="')[1].split('"')[0]
                out[float("inf") if le == "+Inf" else float(le)] = v
        return out

    a, b = buckets(after), buckets(before)
    cum = sorted((le, a[le] - b.get(le, 0.0)) for le in a)
    total = cum[-1][1] if cum else 0.0
    if total <= 0:
        return None
    prev_le, prev_n = 0.0, 0.0
    for le, n in cum:
        if n >= q * total:
            if le == float("inf"):
                return prev_le * 1000
            return 1000 * (prev_le + (le - prev_le) * (q * total - prev_n) / max(n - prev_n, 1e-12))
        prev_le, prev_n = le, n
    return None


def feature_reads(port: int) -> dict[str, float]:
    """The service's `feature_store_read_duration_seconds` samples (`name{labels}` -> value)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {f"{m.group(1)}{{{m.group(2)}}}": float(m.group(3)) for m in
            re.finditer(r"^(feature_store_read_duration_seconds_bucket)\{([^}]*)\} (\S+)$", text, re.M)}


def probe_hits(target: str, n: int) -> dict[str, Any]:
    """`n` sequential calls by card (Zipf customers, fresh seed) reading each answer's `cached` flag: p50 / p99 of
    hits and of misses as the client sees them, i.e. the latency one hit saves."""
    import grpc
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as rpc

    lat: dict[bool, list[float]] = {True: [], False: []}
    with grpc.insecure_channel(target) as channel:
        stub = rpc.FraudServiceStub(channel)
        for tx in loadgen.card_transactions(n, seed=99):
            request = pb.PredictRequest(transaction=pb.Transaction(**tx))
            t0 = time.perf_counter()
            answer = stub.Predict(request, timeout=5).prediction
            lat[answer.cached].append((time.perf_counter() - t0) * 1000)
    out: dict[str, Any] = {"calls": n, "hits": len(lat[True]), "misses": len(lat[False])}
    for cached, name in ((True, "hit"), (False, "miss")):
        if lat[cached]:
            out[f"{name}_p50_ms"] = float(np.percentile(lat[cached], 50))
            out[f"{name}_p99_ms"] = float(np.percentile(lat[cached], 99))
    return out


def card_cache(cfg: Config, repository: Path) -> dict[str, Any]:
    """Fraud scored by card_id with Zipf-drawn customers, prediction cache on and off (features on Redis)."""
    import asyncio

    from fraud_service.materialize import materialize

    results: dict[str, Any] = {}
    for mode in ("on", "off"):
        redis = RedisServer().start()
        asyncio.run(materialize(redis.url, loadgen.CARDS, 42))
        svc = service("fraud", repository, redis_url=redis.url, cache=mode == "on")
        try:
            target = Target("fraud", "grpc", svc.target, payloads=Payloads(loadgen.CARDS_SOURCE, seed=11))
            ports = {"fraud": svc.metrics_port}
            before, reads_before = scrape_all(ports), feature_reads(svc.metrics_port)
            res = loadgen.run([target], [Phase(cfg.cache_s, cfg.cache_rate)],
                              processes=loadgen.worker_processes(cfg.cache_rate))
            after, reads_after = scrape_all(ports), feature_reads(svc.metrics_port)
            probe = probe_hits(svc.target, 2000 if cfg.cache_s >= 10 else 200) if mode == "on" else None
        finally:
            svc.stop()
            redis.stop()
        s = res.summary()
        lat = res.latency
        s["mean_ms"] = float(np.nanmean(lat) * 1000) if len(lat) else None
        s["service"] = observed(before, after, "fraud")
        name = "feature_store_read_duration_seconds"
        s["feature_read_p50_ms"] = histogram_quantile(reads_before, reads_after, name, 0.50)
        s["feature_read_p99_ms"] = histogram_quantile(reads_before, reads_after, name, 0.99)
        if probe:
            s["probe"] = probe
        results[mode] = s
        log(f"cache by card, {mode}: hit rate {fmt(s['service']['cache_hit_rate'], 3)}, p50 {fmt(s['p50_ms'], 2)} "
            f"p99 {fmt(s['p99_ms'], 2)} ms, feature read p50 {fmt(s['feature_read_p50_ms'], 2)} "
            f"p99 {fmt(s['feature_read_p99_ms'], 2)} ms, errors {s['error_count']}")
    return results
