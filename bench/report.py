"""What every benchmark report holds: latency percentiles and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import verdicts


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in milliseconds of latencies given in seconds, and their count."""
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    """CPU count and model, Python version."""
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version()}


# ---------------------------------------------------------------- `make bench`: cost and the assembled report

SECTIONS = ("raw", "cost", "curve", "mix", "spike", "overload", "cache", "swaps", "peer", "price")
"""The scenario files (`<name>.md`, `<name>.json`) report.md is assembled from, in this order (`cost`: CPU per
request against the gRPC floor, bench/cost.py; `price`: $ per 1000 predictions, `price()` here)."""
TARGET_SECTIONS = ("cost", "overload", "mix", "peer")
"""Sections whose JSON carries issue 13's targets (a `targets` list of verdict rows; peer's are derived)."""

GPU_RUNTIME_THROUGHPUT = {
    "cnn": (145_000.0, "ORT CUDA, batch 32, in-process, H100 (BENCHMARKS.md)"),
    "sentiment": (32 / 0.0023, "TorchScript FP16, batch 32 in ~2.3 ms, in-process, H100 (BENCHMARKS.md)"),
}
"""Rows/s measured on an H100 with the runtime alone (no gRPC, no batcher): the GPU cost basis."""


def usd_per_1000(core_seconds_per_prediction: float, usd_per_hour: float) -> float:
    """$ per 1000 predictions at `usd_per_hour` for the resource that spends the given seconds per prediction."""
    return core_seconds_per_prediction * 1000 / 3600 * usd_per_hour


def efficiency(raw_cpu: dict[str, Any], grpc: dict[str, Any], rest: dict[str, Any]) -> dict[str, float | None]:
    """Served predictions per server core-second at the SLO against the runtime alone per core-second: gRPC
    against batch 1 and against the best batch, REST (service + Envoy) against the best batch. None where the
    served figure is missing."""
    gr, sr = grpc.get("rps_per_server_core"), rest.get("rps_per_server_core")
    return {"grpc_vs_batch1": gr / raw_cpu["batch1_rows_per_core_s"] if gr else None,
            "grpc_vs_best": gr / raw_cpu["rows_per_core_s"] if gr else None,
            "rest_vs_best": sr / raw_cpu["rows_per_core_s"] if sr else None}


def price(out: Path, cpu_core_hour_usd: float, gpu_hour_usd: float) -> dict[str, Any]:
    """$ per 1000 predictions per model from this run's raw.json and curve.json; writes price.{json,md}."""
    raw = _load(out / "raw.json") or {}
    curve = _load(out / "curve.json") or {}
    cpus = os.cpu_count() or 1
    rows: dict[str, dict[str, Any]] = {}
    for model in ("fraud", "cnn", "sentiment"):
        r: dict[str, Any] = {}
        rm = raw.get("models", {}).get(model)
        if rm:
            best_b, best = max(rm["batches"].items(), key=lambda kv: kv[1]["rows_per_core_s"] or 0)
            per_core = best["rows_per_core_s"]
            b1 = rm["batches"]["1"]["rows_per_core_s"]
            r["raw_cpu"] = {"batch": int(best_b), "rows_per_core_s": per_core, "batch1_rows_per_core_s": b1,
                            "usd_per_1000": usd_per_1000(1 / per_core, cpu_core_hour_usd)}
        cm = curve.get("models", {}).get(model)
        for path, roles in (("grpc", (model,)), ("rest", (model, "envoy"))):
            at = cm and cm.get(path, {}).get("at_slo")
            if not at or not at["achieved_rps"]:
                continue
            cpu_cores = sum(at["cpu_pct"].get(role, 0.0) for role in roles) / 100
            rps = at["achieved_rps"]
            r[f"served_{path}"] = {
                "rps_at_slo": rps, "server_cores": cpu_cores,
                "rps_per_server_core": rps / cpu_cores if cpu_cores else None,
                "usd_per_1000_server_cpu": usd_per_1000(cpu_cores / rps, cpu_core_hour_usd) if cpu_cores else None,
                "usd_per_1000_whole_machine": usd_per_1000(cpus / rps, cpu_core_hour_usd)}
        if model in GPU_RUNTIME_THROUGHPUT:
            tput, basis = GPU_RUNTIME_THROUGHPUT[model]
            r["gpu_runtime_estimate"] = {"rows_per_s": tput, "basis": basis,
                                         "usd_per_1000": usd_per_1000(1 / tput, gpu_hour_usd)}
        rows[model] = r
    data = {"cpu_core_hour_usd": cpu_core_hour_usd, "gpu_hour_usd": gpu_hour_usd, "machine_cpus": cpus,
            "models": rows}

    def usd(v: float | None) -> str:
        return "—" if v is None else f"${v:.2g}"

    md = ["## Cost per 1000 predictions", "",
          f"**Assumptions (inputs):** CPU ${cpu_core_hour_usd:.3f} per core-hour, GPU ${gpu_hour_usd:.2f} per "
          "GPU-hour (`--cpu-core-hour-usd`, `--gpu-hour-usd`). Throughput at SLO is the highest step of the latency "
          "curve whose p99 met the SLO. **server CPU**: the CPU the service (and Envoy, for REST) measurably used per "
          "prediction at that step, billed per core-hour — the marginal cost with cores to spare; **whole machine**: "
          f"all {cpus} cores of this box (load generator included) divided by that rate — the cost of this box as "
          "measured. **raw**: the runtime alone at its best batch, per core-second of CPU it used — the floor. "
          "**GPU** figures "
          "are *estimates*: runtime-only throughput measured in-process on an H100 (no gRPC, batcher or "
          "pre-processing), not a served GPU measurement.", "",
          "| model | raw CPU (batch) | served gRPC, server CPU | served gRPC, whole machine | "
          "served REST, server CPU | "
          "served REST, whole machine | GPU runtime-only estimate |", "|---|---|---|---|---|---|---|"]
    for model, r in rows.items():
        raw_c = r.get("raw_cpu")
        g, s = r.get("served_grpc", {}), r.get("served_rest", {})
        gpu = r.get("gpu_runtime_estimate")
        batch_note = f" (b{raw_c['batch']})" if raw_c else ""
        md.append(f"| {model} | {usd(raw_c and raw_c['usd_per_1000'])}"
                  f"{batch_note} | "
                  f"{usd(g.get('usd_per_1000_server_cpu'))} | {usd(g.get('usd_per_1000_whole_machine'))} | "
                  f"{usd(s.get('usd_per_1000_server_cpu'))} | {usd(s.get('usd_per_1000_whole_machine'))} | "
                  f"{usd(gpu and gpu['usd_per_1000'])}{' (estimate)' if gpu else ' (not measured)'} |")
    md += ["", "**Served vs raw efficiency** (served predictions per second per core of the server processes at "
           "the SLO, against the runtime alone per core-second of CPU; the gap is gRPC/HTTP, Python, the batcher, "
           "Envoy):", "",
           "| model | raw rows/s/core, batch 1 | raw rows/s/core, best batch | served gRPC req/s/core | "
           "efficiency vs b1 | vs best | served REST req/s/core (service+Envoy) | efficiency vs best |",
           "|---|---|---|---|---|---|---|---|"]
    for model, r in rows.items():
        raw_c, g, s = r.get("raw_cpu"), r.get("served_grpc", {}), r.get("served_rest", {})
        if not raw_c:
            continue
        gr, sr = g.get("rps_per_server_core"), s.get("rps_per_server_core")
        e = r["efficiency"] = efficiency(raw_c, g, s)

        def pct(v: float | None) -> str:
            return "—" if v is None else f"{100 * v:.1f} %"

        md.append(f"| {model} | {raw_c['batch1_rows_per_core_s']:,.0f} | {raw_c['rows_per_core_s']:,.0f} | "
                  f"{'—' if gr is None else f'{gr:,.0f}'} | {pct(e['grpc_vs_batch1'])} | {pct(e['grpc_vs_best'])} | "
                  f"{'—' if sr is None else f'{sr:,.0f}'} | {pct(e['rest_vs_best'])} |")
    md.append("")
    (out / "price.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "price.md").write_text("\n".join(md) + "\n")
    return data


def target_rows(out: Path) -> list[dict[str, Any]]:
    """Every verdict row the run's sections recorded (cost, overload, mix; peer's derived from peer.json), in the
    issue's item order."""
    rows: list[dict[str, Any]] = []
    for name in TARGET_SECTIONS:
        data = _load(out / f"{name}.json")
        if data is None:
            continue
        rows += verdicts.peer_rows(data) if name == "peer" else data.get("targets", [])
    return sorted(rows, key=lambda r: r["item"])


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    """The report's "Targets" section: each target of issue 13 with its measured value, goal and verdict."""
    judged = [r for r in rows if r["met"] is not None]
    met = sum(1 for r in judged if r["met"])
    md = ["## Targets (issue 13)", "",
          f"{met} of {len(judged)} judged targets met (rows marked — are reported figures without a goal of their "
          "own, or had nothing to judge). Items: 1 per-request cost, 3 overload, 4 the 1000 req/s mix, 5 peer.", "",
          *verdicts.targets_table(rows, with_item=True)]
    return [*md, ""]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def assemble(out: Path, commands: list[str], extra: dict[str, Any] | None = None) -> Path:
    """report.md (header + every section present, in SECTIONS order) and report.json (all figures).

    Re-assembling a directory keeps the commands recorded by earlier runs into it."""
    previous = _load(out / "report.json") or {}
    commands = [c for c in previous.get("commands", []) if c not in commands] + commands
    if (out / "peer.json").exists() and not any("peer_mlserver" in c for c in commands):
        commands.insert(len(commands) - 1, f"python bench/peer_mlserver.py --out {out}")
    header = [f"# Benchmark report {out.name}", "",
              f"**Machine:** {machine()['cpus']} CPUs, {machine()['cpu_model']}, Python {machine()['python']}; "
              f"load generator, gateway and services share them, on loopback.",
              f"**Date:** {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
              "**Commands:** " + "; ".join(f"`{c}`" for c in commands) + ".", ""]
    for key, value in (extra or {}).items():
        header.append(f"**{key}:** {value}")
    header.append("")
    body, figures = [], {"machine": machine(), "commands": commands, **(extra or {})}
    rows = target_rows(out)
    figures["targets"] = rows
    if rows:
        body.append("\n".join(targets_table(rows)))
    for name in SECTIONS:
        md, js = out / f"{name}.md", out / f"{name}.json"
        if md.exists():
            text = md.read_text()
            if name == "peer" and (out / "peer.png").exists() and "peer.png" not in text:
                text += "\n![peer](peer.png)\n"
            body.append(text)
        if js.exists():
            figures[name] = json.loads(js.read_text())
    report = out / "report.md"
    report.write_text("\n".join(header) + "\n" + "\n".join(body))
    (out / "report.json").write_text(json.dumps(figures, indent=2) + "\n")
    return report
