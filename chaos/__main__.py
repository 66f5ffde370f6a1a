"""python -m chaos run [--scenarios a,b] [--quick] --out DIR   (make chaos)
python -m chaos soak --duration 30m [--rate R] --out DIR          (make soak DURATION=30m)

Both start the platform on free loopback ports (chaos.platform: make run's supervised stack, two replicas per
service), stop it when done, and write report.md + report.json under --out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from chaos import report, soak
from chaos.platform import ROOT, SERVICES, Platform
from chaos.scenarios import SCENARIOS, Context, git_commit, log, machine
from chaos.traffic import MIX, Traffic, Verifier


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.scenarios.split(",")] if args.scenarios else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    conditions: dict[str, Any] = {
        "command": " ".join(["python -m chaos", *sys.argv[1:]]), "commit": git_commit(), "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "platform": f"{', '.join(args.services)} x {args.replicas} replicas (supervised, make run's Stack), Redis "
                    "behind a delaying proxy, Envoy with hot restart on; all on 127.0.0.1",
        "steady traffic": f"{args.rate:g} req/s open loop through the gateway: "
                          + ", ".join(f"{k} {v:.0%}" for k, v in MIX.items())
                          + "; answers checked at 4 req/s by the verifier (fixed questions, healthy answers)"}
    results = []
    log(f"starting the platform under {out}")
    platform = Platform(out / "run", args.model_repository, tuple(args.services), args.replicas).start()
    try:
        verifier = Verifier("127.0.0.1", platform.gateway_port, args.model_repository, models=tuple(args.services))
        verifier.learn()
        mix = {k: v for k, v in MIX.items() if k.split("/")[0] in args.services}
        ctx = Context(platform, args.rate, verifier, out, 0.5 if args.quick else 1.0, mix)
        for name in names:
            results.append(SCENARIOS[name](ctx))
            report.write(out, results, conditions)
    finally:
        platform.stop()
    conditions["duration"] = f"{(time.time() - t_start) / 60:.1f} min"
    path = report.write(out, results, conditions)
    met = sum(r.verdict()[0] for r in results)
    log(f"{met}/{len(results)} scenarios met their target; report: {path}")
    return 0


def run_soak(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    duration = soak.parse_duration(args.duration)
    warmup = min(120.0, duration * 0.2)
    log(f"soak: starting the platform under {out}")
    platform = Platform(out / "run", args.model_repository, tuple(args.services), args.replicas).start()
    result: dict[str, Any] = {"duration_s": duration, "warmup_s": warmup, "machine": machine(),
                              "commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "mix": MIX}
    try:
        if args.rate:
            rate = args.rate
            result["rate_note"] = "given with --rate"
        else:
            cap, steps = soak.capacity(platform, [40, 80, 120, 160, 220, 300])
            result["capacity_ramp"] = steps
            result["capacity_rps"] = cap
            rate = max(10.0, cap / 2)
            result["rate_note"] = f"half the capacity of the mix measured by the ramp ({cap:g} req/s)"
        result["rate_rps"] = rate
        log(f"soak: {rate:g} req/s for {duration:g} s")
        with soak.ProcessSampler(platform.processes, interval_s=args.sample_s,
                                 extra=lambda: {"redis": soak.redis_figures(platform)}) as sampler:
            traffic = Traffic(f"127.0.0.1:{platform.gateway_port}", rate, duration, "soak", processes=1).start()
            res = traffic.join()
        result["samples"] = sampler.samples
        s = res.summary()
        result["requests"] = s["requests"]
        result["outcomes"] = {"ok": s["ok"], **s["errors"]}
        result["p99_over_time"] = soak.p99_over_time(res, 60.0)
        result["p99_drift"] = {t: soak.drift(rows, warmup) for t, rows in result["p99_over_time"].items()}
        result["flat"] = {m: soak.flatness(sampler.samples, m, warmup) for m in ("rss_mb", "fds", "tcp")}
        result["restarts"] = {p.name: p.restarts for g in platform.stack.groups.values() for p in g.slots if p}
    finally:
        platform.stop()
    (out / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "report.md").write_text(soak_markdown(result))
    log(f"soak report: {out / 'report.md'}")
    return 0


def soak_markdown(r: dict[str, Any]) -> str:
    """The soak's report: conditions, outcomes, flatness per process and metric, p99 drift per model."""
    lines = ["# Soak", "", f"- **Started:** {r['started']} (commit {r['commit']})", f"- **Machine:** {r['machine']}",
             f"- **Duration:** {r['duration_s'] / 60:g} min, warm-up {r['warmup_s']:g} s excluded from the verdicts",
             f"- **Rate:** {r['rate_rps']:g} req/s ({r['rate_note']}); mix {r['mix']}",
             f"- **Requests:** {r['requests']}; outcomes {report.fmt_counts(r['outcomes'])}",
             f"- **Restarts during the soak:** {r['restarts']}"]
    redis = [s["extra"]["redis"] for s in r["samples"] if "redis" in s.get("extra", {})]
    if len(redis) >= 2:
        first, last = redis[0], redis[-1]
        mib = 2**20
        lines.append(f"- **Redis's data:** keys {first['keys']} -> {last['keys']}, audit stream "
                     f"{first['audit_len']} -> {last['audit_len']} entries, used memory "
                     f"{first['used_memory'] / mib:.1f} -> {last['used_memory'] / mib:.1f} MiB, clients "
                     f"{first['connected_clients']} -> {last['connected_clients']}")
    lines.append("")
    for metric, label in (("rss_mb", "RSS MiB"), ("fds", "open fds"), ("tcp", "TCP connections")):
        rows = r["flat"][metric]
        ok = all(v["flat"] for v in rows.values() if not v["restarted"])
        lines += [f"## {label}: {'flat' if ok else 'NOT flat'} (first vs last 15 % after warm-up, tolerance 5 %)", "",
                  "| process | first | last | growth % | max | verdict |", "|---|---|---|---|---|---|"]
        for role, v in rows.items():
            verdict = "restarted" if v["restarted"] else ("flat" if v["flat"] else "**grows**")
            lines.append(f"| {role} | {v['first']} | {v['last']} | {v['growth_pct']} | {v['max']} | {verdict} |")
        lines.append("")
    lines += ["## p99 per model and path over time (every request, 60 s windows)", "",
              "| target | first p99 ms | last p99 ms | last / first | max p99 ms | drift verdict |",
              "|---|---|---|---|---|---|"]
    for target, d in r["p99_drift"].items():
        verdict = "-" if d.get("flat") is None else ("no drift" if d["flat"] else "**drifts**")
        lines.append(f"| {target} | {d.get('first_ms')} | {d.get('last_ms')} | {d.get('ratio')} | {d.get('max_ms')} | "
                     f"{verdict} |")
    lines += ["", "Per-minute figures: soak.json (`p99_over_time`, `samples`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in ("run", "soak"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=ROOT / "build" / "chaos" / (stamp if name == "run"
                                                                                else f"soak-{stamp}"))
        p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
        p.add_argument("--services", type=lambda s: [x for x in s.split(",") if x], default=list(SERVICES))
        p.add_argument("--replicas", type=int, default=2)
        p.add_argument("--rate", type=float, default=40.0 if name == "run" else None,
                       help="steady traffic, req/s of the mix (soak: default half the measured capacity)")
    sub.choices["run"].add_argument("--scenarios", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    sub.choices["run"].add_argument("--quick", action="store_true", help="every phase halved (a smoke run)")
    sub.choices["soak"].add_argument("--duration", default="30m", help="e.g. 30m, 600s, 1h")
    sub.choices["soak"].add_argument("--sample-s", type=float, default=10.0, help="process sampling interval")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else run_soak(args)


if __name__ == "__main__":
    sys.exit(main())
