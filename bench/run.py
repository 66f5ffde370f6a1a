"""`make bench` and its parts: `python -m bench <scenario ...> [--quick] [--out DIR]`.

Scenarios: raw, cost (bench/cost.py: CPU per request against the gRPC floor, the gateway's CPU per call),
curve, mix, spike, overload (bench/overload.py: 2x / 4x capacity and a spike), cache, swaps
(bench/swaps.py: 50 hot swaps of fraud under steady load, answers and memory checked), and peer
(bench/peer_mlserver.py, run by `make bench` into the same directory); `all` = every one but peer;
`report` only re-assembles report.md / report.json (the price section and the Targets table) from the
JSON already in --out. cost, curve, mix, spike and overload share one platform (Redis, the three
services with their cache off, the Envoy gateway) started on free loopback ports; raw runs in-process;
cache and swaps start their own fraud services. Progress lines go to
stdout. Output: --out, else $BENCH_OUT, else bench/results/<UTC timestamp>/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cost, overload, report, scenarios  # noqa: E402
from bench.stack import Stack, log  # noqa: E402

ORDER = ("raw", "cost", "curve", "mix", "spike", "overload", "cache", "swaps")
NEEDS_STACK = {"cost", "curve", "mix", "spike", "overload"}


SCENARIOS = {"cost": cost.cost, "curve": scenarios.curve, "mix": scenarios.mix, "spike": scenarios.spike,
             "overload": overload.overload}
"""The scenarios run against the shared platform (`Stack`)."""


def output_dir(arg: Path | None) -> Path:
    out = arg or (Path(os.environ["BENCH_OUT"]) if os.environ.get("BENCH_OUT") else
                  ROOT / "bench" / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="+", choices=(*ORDER, "all", "report"))
    parser.add_argument("--quick", action="store_true", help="smoke variant: a few seconds per scenario")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--cpu-core-hour-usd", type=float,
                        default=float(os.environ.get("BENCH_CPU_CORE_HOUR_USD", "0.05")),
                        help="price of one CPU core (vCPU) for an hour (default 0.05: on-demand general-purpose x86)")
    parser.add_argument("--gpu-hour-usd", type=float, default=float(os.environ.get("BENCH_GPU_HOUR_USD", "4.00")),
                        help="price of one H100 GPU for an hour (default 4.00)")
    parser.add_argument("--overload-target", action="append", default=None, metavar="MODEL/PATH",
                        help="what the overload scenario overloads (repeatable; default sentiment/rest; "
                             "path grpc = typed gRPC straight to the service, rest = through the gateway)")
    args = parser.parse_args(argv)
    wanted = set(args.scenarios)
    names = [n for n in ORDER if "all" in wanted or n in wanted]
    out = output_dir(args.out)
    cfg = scenarios.Config.quick() if args.quick else scenarios.Config.full()
    if args.overload_target:
        cfg.overload_targets = tuple(tuple(t.split("/", 1)) for t in args.overload_target)  # type: ignore[assignment]
    repo = args.model_repository.resolve()
    log(f"bench {' '.join(names) or 'report'}{' (quick)' if args.quick else ''} -> {out}")
    t0 = time.monotonic()
    if "raw" in names:
        scenarios.raw(out, repo, cfg)
    stack_names = [n for n in names if n in NEEDS_STACK]
    if stack_names:
        with Stack(repo) as stack:
            for name in stack_names:
                waited = stack.wait_idle()
                log(f"scenario {name}" + (f" (waited {waited:.0f} s for the queues to drain)" if waited >= 1 else ""))
                SCENARIOS[name](out, stack, cfg)
    if "cache" in names:
        log("scenario cache")
        scenarios.cache(out, repo, cfg)
    if "swaps" in names:
        log("scenario swaps")
        subprocess.run([sys.executable, "-m", "bench.swaps", "--out", str(out), "--model-repository", str(repo),
                        *(["--quick"] if args.quick else [])], cwd=ROOT, check=True)
    report.price(out, args.cpu_core_hour_usd, args.gpu_hour_usd)
    cmd = "python -m bench " + " ".join(args.scenarios) + (" --quick" if args.quick else "")
    path = report.assemble(out, [cmd], {
        "Prices assumed": f"CPU ${args.cpu_core_hour_usd:.3f}/core-hour, GPU ${args.gpu_hour_usd:.2f}/GPU-hour",
        "p99 SLOs": ", ".join(f"{m} {v:.0f} ms" for m, v in scenarios.SLO_P99_MS.items())
        + " (fraud and sentiment from the seed; cnn's is this bench's assumption)",
        "Variant": "quick (smoke: figures are not measurements)" if args.quick else "full"})
    log(f"report: {path} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
