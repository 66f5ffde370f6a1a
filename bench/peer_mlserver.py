"""Peer comparison: MLServer serving the same XGBoost model vs our fraud service, under perf_analyzer.

    python bench/peer_mlserver.py --out DIR [--quick] [--tune]

Both servers run at once on free loopback ports: our fraud service (`python -m fraud_service`, model
`fraud` v1's `model.onnx`, its config's batching as shipped, Redis cache OFF so every request runs the
model) and MLServer 1.7.1 with `mlserver-xgboost` (the same trees from `model.ubj`, adaptive batching
on, `parallel_workers=0`, `OMP_NUM_THREADS=1`). The load generator is Triton's C++ `perf_analyzer`
(OIP v2 gRPC, sync clients; `-f` CSV) for both, with the same input rows (the model's `sample.json`).
Each load level (closed loop at 1/8/32 in flight, and one open-loop request rate) is measured for
ours, then MLServer, then ours ... alternating within one run for several rounds; the report gives
medians of the rounds. MLServer lacks Triton's `ModelConfig` RPC, which perf_analyzer needs once per
run: `bench/mlserver_launch.py` answers it inside MLServer's own gRPC server (no proxy, no extra hop).

MLServer and perf_analyzer live in their own virtualenvs (`make bench-deps`: `.venv-mlserver`,
`.venv-perf`), never in the platform's. Writes `DIR/peer.json`, `DIR/peer.md`, `DIR/peer.png`.
`--tune` first measures a few MLServer batching settings and serves the best one (`DIR/peer-tune.json`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlplatform.launch import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine  # noqa: E402

MODEL = "fraud"
MLSERVER_VENV = ROOT / ".venv-mlserver"
PERF_VENV = ROOT / ".venv-perf"
LAUNCHER = ROOT / "bench" / "mlserver_launch.py"


@dataclass(frozen=True)
class MLServerSettings:
    """The MLServer knobs this bench sets (everything else is MLServer's default)."""

    max_batch_size: int = 32  # adaptive batching: rows per batch (MLServer's default 0 = batching off)
    max_batch_time_s: float = 0.002  # adaptive batching: longest wait for batch-mates
    parallel_workers: int = 0  # 0 = inference in the server process (fastest on 2 cores)
    omp_threads: int = 1  # XGBoost's OpenMP threads; more makes it erratic on 2 shared cores
    debug: bool = False  # MLServer's default True logs every request (an access-log line per call)
    metrics: bool = True  # Prometheus /metrics and its gRPC interceptor (ours keeps its metrics on too)


# Tried with --tune at 32 and 1 in flight (BENCHMARKS.md "Peer"); the first is the one served by default.
# The scenario serves MLServer with adaptive batching on; batching off (max_batch_size 0) is measured
# for reference only.
MLSERVER_CANDIDATES: tuple[MLServerSettings, ...] = (
    MLServerSettings(32, 0.002, 0),
    MLServerSettings(16, 0.001, 0),
    MLServerSettings(64, 0.005, 0),
    MLServerSettings(32, 0.002, 1),
    MLServerSettings(32, 0.002, 0, debug=True),  # MLServer's default logging
    MLServerSettings(0, 0.0, 0),
)


@dataclass(frozen=True)
class Level:
    """One load level: `concurrency` (closed loop, sync clients) or `rate` (open loop, requests/s)."""

    mode: str
    value: int

    @property
    def label(self) -> str:
        return f"{self.value} in flight" if self.mode == "concurrency" else f"{self.value} req/s open loop"

    def perf_args(self) -> list[str]:
        flag = "--concurrency-range" if self.mode == "concurrency" else "--request-rate-range"
        return [flag, f"{self.value}:{self.value}"]


LEVELS = (Level("concurrency", 1), Level("concurrency", 8), Level("concurrency", 32), Level("rate", 400))


# --------------------------------------------------------------------------- pure logic


def model_settings(settings: MLServerSettings, uri: str) -> dict[str, Any]:
    """MLServer's model-settings.json: the XGBoost runtime on `uri`, inputs/outputs declared, batching."""
    return {
        "name": MODEL,
        "implementation": "mlserver_xgboost.XGBoostModel",
        "max_batch_size": settings.max_batch_size,
        "max_batch_time": settings.max_batch_time_s,
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
        # predict_proba only: the same work as our ONNX graph's one pass (label is a threshold on it).
        "outputs": [{"name": "predict_proba", "datatype": "FP32", "shape": [-1, 2]}],
        "parameters": {"uri": uri, "version": "1"},
    }


def server_settings(settings: MLServerSettings, http_port: int, grpc_port: int, metrics_port: int
                    ) -> dict[str, Any]:
    """MLServer's settings.json: loopback ports and the worker count."""
    return {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": settings.parallel_workers,
        "debug": settings.debug,
        "metrics_endpoint": "/metrics" if settings.metrics else None,
        "load_models_at_startup": True,
    }


def model_config_message(settings: MLServerSettings) -> dict[str, Any]:
    """Triton `ModelConfig` fields (protobuf JSON names) describing MLServer's model to perf_analyzer."""
    return {
        "name": MODEL,
        "platform": "mlserver_xgboost",
        "max_batch_size": max(settings.max_batch_size, 1),
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": ["30"]}],
        "output": [{"name": "predict_proba", "data_type": "TYPE_FP32", "dims": ["2"]}],
    }


def perf_input_data(sample: dict[str, Any]) -> dict[str, Any]:
    """perf_analyzer `--input-data` JSON: one request per row of the model's sample.json."""
    return {"data": [{"features": {"content": row["features"], "shape": [len(row["features"])]}}
                     for row in sample["rows"]]}


def parse_perf_csv(text: str) -> dict[str, float]:
    """perf_analyzer's `-f` CSV (one load level): throughput and client latencies (µs in the file, ms here).

    Server-side columns appear only when the server answers Triton's statistics RPC (neither does here).
    """
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r and any(v for v in r.values())]
    if len(rows) != 1:
        raise ValueError(f"expected one result row in perf_analyzer's CSV, got {len(rows)}")
    row = rows[0]
    try:
        result = {"rps": float(row["Inferences/Second"])}
        for key, column in (("p50_ms", "p50 latency"), ("p90_ms", "p90 latency"), ("p99_ms", "p99 latency")):
            result[key] = float(row[column]) / 1000.0
    except KeyError as exc:
        raise ValueError(f"perf_analyzer's CSV lacks column {exc}") from None
    return result


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric medians over rounds."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """Ours / MLServer for throughput (>1: ours faster) and latencies (<1: ours faster)."""
    return {key: ours[key] / theirs[key] for key in ("rps", "p50_ms", "p99_ms") if theirs[key] > 0}


# --------------------------------------------------------------------------- processes


def ensure_deps() -> None:
    """Create the MLServer and perf_analyzer virtualenvs (make bench-deps; a no-op when stamped)."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "bench-deps"], check=True)


def perf_env() -> dict[str, str]:
    """perf_analyzer's environment: the CUDA runtime wheel's lib dir on LD_LIBRARY_PATH (it links it)."""
    libs = sorted(str(p) for p in (PERF_VENV / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


def model_config_bytes(settings: MLServerSettings) -> bytes:
    """Serialized Triton ModelConfigResponse for MLServer's model (tritonclient's classes, in .venv-perf)."""
    script = (
        "import json, sys\n"
        "from google.protobuf import json_format\n"
        "from tritonclient.grpc import service_pb2\n"
        "msg = json_format.ParseDict({'config': json.loads(sys.argv[1])}, service_pb2.ModelConfigResponse())\n"
        "sys.stdout.buffer.write(msg.SerializeToString())\n"
    )
    return subprocess.run([str(PERF_VENV / "bin" / "python"), "-c", script,
                           json.dumps(model_config_message(settings))],
                          check=True, capture_output=True).stdout


class MLServerProcess:
    """MLServer (`bench/mlserver_launch.py`) on free loopback ports, serving `model.ubj`."""

    def __init__(self, version_dir: Path, settings: MLServerSettings) -> None:
        self.settings = settings
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-mlserver-"))
        model_dir = self.workdir / MODEL
        model_dir.mkdir()
        (model_dir / "model-settings.json").write_text(json.dumps(
            model_settings(settings, str((version_dir / "model.ubj").resolve())), indent=2))
        (self.workdir / "settings.json").write_text(json.dumps(
            server_settings(settings, self.http_port, self.grpc_port, self.metrics_port), indent=2))
        (self.workdir / "model-config.pb").write_bytes(model_config_bytes(settings))
        self.log = self.workdir / "mlserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0) -> MLServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.settings.omp_threads), "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("MLSERVER_")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(MLSERVER_VENV / "bin" / "python"), str(LAUNCHER), str(self.workdir),
                 str(self.workdir / "model-config.pb")],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        ready = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MLServer exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"MLServer not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def perf_analyzer(target: str, level: Level, input_file: Path, window_ms: int) -> dict[str, float]:
    """One perf_analyzer measurement (3 windows of `window_ms`, reported together) at `level`."""
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        csv_path = Path(tmp) / "perf.csv"
        cmd = [str(PERF_VENV / "bin" / "perf_analyzer"), "-m", MODEL, "-u", target, "-i", "grpc",
               *level.perf_args(), "--input-data", str(input_file),
               "--measurement-mode", "time_windows", "-p", str(window_ms),
               # The first 3 windows count whatever their spread: bounded time; rounds give the medians.
               "--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv_path)]
        proc = subprocess.run(cmd, env=perf_env(), capture_output=True, text=True, timeout=60 + window_ms / 100)
        if proc.returncode != 0 or not csv_path.is_file():
            raise RuntimeError(f"perf_analyzer failed ({proc.returncode}) against {target} at {level.label}:\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return parse_perf_csv(csv_path.read_text())


# --------------------------------------------------------------------------- scenario


def measure(ours_target: str, theirs_target: str, levels: tuple[Level, ...], rounds: int, input_file: Path,
            window_ms: int) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Per level, `rounds` alternating measurements: ours, MLServer, ours, ... (the order flips each round)."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for level in levels:
        cell = runs.setdefault(level.label, {"ours": [], "mlserver": []})
        for r in range(rounds):
            order = [("ours", ours_target), ("mlserver", theirs_target)]
            for name, target in order if r % 2 == 0 else order[::-1]:
                result = perf_analyzer(target, level, input_file, window_ms)
                cell[name].append(result)
                print(f"  {level.label:>22}  round {r + 1}  {name:>8}  {result['rps']:7.0f} req/s  "
                      f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms", flush=True)
    return runs


def tune(version_dir: Path, input_file: Path, window_ms: int, rounds: int) -> list[dict[str, Any]]:
    """Each MLServer candidate at 32 in flight and at 1: medians of `rounds`; best throughput at 32 first."""
    results = []
    for candidate in MLSERVER_CANDIDATES:
        server = MLServerProcess(version_dir, candidate).start()
        try:
            cells = {lv.label: summarize([perf_analyzer(server.target, lv, input_file, window_ms)
                                          for _ in range(rounds)])
                     for lv in (Level("concurrency", 32), Level("concurrency", 1))}
        finally:
            server.stop()
        results.append({"settings": asdict(candidate), "results": cells})
        print(f"  tune {asdict(candidate)}: {json.dumps(cells)}", flush=True)
    return sorted(results, key=lambda r: -r["results"]["32 in flight"]["rps"])


def run(out_dir: Path, *, quick: bool = False, tune_first: bool = False,
        model_repository: Path = ROOT / "model_repository") -> dict[str, Any]:
    """The whole scenario; writes peer.json, peer.md and peer.png into `out_dir` and returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_deps()
    version_dir = model_repository / MODEL / "1"
    if not (version_dir / "model.ubj").is_file():
        raise SystemExit(f"{version_dir}/model.ubj is missing: run `make models` (rebuilds fraud once)")
    window_ms, rounds = (1000, 2) if quick else (2000, 3)
    input_file = out_dir / "peer-input.json"
    input_file.write_text(json.dumps(perf_input_data(json.loads((version_dir / "sample.json").read_text()))))

    settings = MLSERVER_CANDIDATES[0]
    tuning = None
    if tune_first:
        tuning = tune(version_dir, input_file, 1000, rounds=1 if quick else 2)
        (out_dir / "peer-tune.json").write_text(json.dumps(tuning, indent=2))
        settings = next(MLServerSettings(**t["settings"]) for t in tuning if t["settings"]["max_batch_size"] > 1)

    ours_env = {"FRAUD_MODEL_REPOSITORY": str(model_repository), "FRAUD_LOG_LEVEL": "WARNING",
                "FRAUD_CACHE_ENABLED": "false"}
    started = time.time()
    ours = ServiceProcess("fraud_service", "FRAUD_", env=ours_env).start()
    try:
        theirs = MLServerProcess(version_dir, settings).start()
        try:
            print(f"peer: ours {ours.target}, MLServer {theirs.target} ({asdict(settings)})", flush=True)
            for target in (ours.target, theirs.target):  # warm both (connections, first batches)
                perf_analyzer(target, Level("concurrency", 8), input_file, 500)
            runs = measure(ours.target, theirs.target, LEVELS, rounds, input_file, window_ms)
            mls_model_settings = model_settings(settings, "<repository>/fraud/1/model.ubj")
            mls_server_settings = server_settings(settings, 0, 0, 0)
        finally:
            theirs.stop()
    finally:
        ours.stop()

    our_config = json.loads((version_dir / "config.json").read_text())
    levels = []
    for level in LEVELS:
        o, t = summarize(runs[level.label]["ours"]), summarize(runs[level.label]["mlserver"])
        levels.append({"level": level.label, "mode": level.mode, "value": level.value, "ours": o,
                       "mlserver": t, "ratio_ours_over_mlserver": ratios(o, t), "runs": runs[level.label]})
    report = {
        "scenario": "peer_mlserver",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": quick, "rounds": rounds, "window_ms": window_ms, "windows_per_measurement": 3,
        "machine": machine(),
        "load_generator": "perf_analyzer 2.51.0 (tritonclient[all] wheel), OIP v2 gRPC, sync clients, "
                          "input rows from fraud/1/sample.json",
        "ours": {"server": "fraud_service (python -m fraud_service)", "artifact": "fraud/1/model.onnx",
                 "cache": "off (FRAUD_CACHE_ENABLED=false)", "batching": our_config["batching"],
                 "runtime": our_config["runtime"]},
        "mlserver": {"versions": mlserver_versions(), "artifact": "fraud/1/model.ubj",
                     "settings": asdict(settings), "model_settings": mls_model_settings,
                     "server_settings": {k: v for k, v in mls_server_settings.items() if "port" not in k},
                     "env": {"OMP_NUM_THREADS": str(settings.omp_threads)}},
        "model_config": "MLServer has no ModelConfig RPC; bench/mlserver_launch.py adds a handler for "
                        "inference.GRPCInferenceService/ModelConfig to MLServer's own grpc.aio server "
                        "(same process, same port), answering with a fixed ModelConfigResponse; "
                        "every other RPC is MLServer's own.",
        "tuning": tuning,
        "levels": levels,
    }
    (out_dir / "peer.json").write_text(json.dumps(report, indent=2))
    (out_dir / "peer.md").write_text(markdown(report))
    plot(report, out_dir / "peer.png")
    input_file.unlink(missing_ok=True)
    return report


def mlserver_versions() -> dict[str, str]:
    """Versions installed in .venv-mlserver (mlserver, mlserver-xgboost, xgboost, uvloop)."""
    script = ("import importlib.metadata as m, json\n"
              "print(json.dumps({p: m.version(p) for p in ('mlserver', 'mlserver-xgboost', 'xgboost', 'uvloop')}))")
    out = subprocess.run([str(MLSERVER_VENV / "bin" / "python"), "-c", script], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


# --------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    """The `## Peer: MLServer vs our fraud service` section."""
    m = report["machine"]
    lines = [
        "## Peer: MLServer vs our fraud service",
        "",
        f"{report['date']}; {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}; load generator, both "
        "servers share the machine, loopback. " + report["load_generator"] + ". "
        f"Medians of {report['rounds']} alternating rounds per level (ours/MLServer order flips each round); "
        f"each measurement is 3 windows of {report['window_ms']} ms."
        + (" **Quick run** (short windows): indicative only." if report["quick"] else ""),
        "",
        "| load | ours req/s | MLServer req/s | ratio | ours p50 ms | MLServer p50 ms | ours p99 ms "
        "| MLServer p99 ms | p99 ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        o, t, r = lv["ours"], lv["mlserver"], lv["ratio_ours_over_mlserver"]
        lines.append(f"| {lv['level']} | {o['rps']:.0f} | {t['rps']:.0f} | {r.get('rps', 0):.2f} "
                     f"| {o['p50_ms']:.2f} | {t['p50_ms']:.2f} | {o['p99_ms']:.2f} | {t['p99_ms']:.2f} "
                     f"| {r.get('p99_ms', 0):.2f} |")
    mls = report["mlserver"]
    lines += [
        "",
        "Ratios are ours / MLServer (throughput > 1 and latency < 1 favour ours).",
        "",
        f"- **Ours:** {report['ours']['server']} serving `{report['ours']['artifact']}` (ONNX Runtime), "
        f"cache {report['ours']['cache']}, batching as shipped `{json.dumps(report['ours']['batching'])}`, "
        f"runtime `{json.dumps(report['ours']['runtime'])}`.",
        f"- **MLServer:** {', '.join(f'{k} {v}' for k, v in mls['versions'].items())}, serving "
        f"`{mls['artifact']}` (the same trees, saved by the fraud build); `model-settings.json` "
        f"`{json.dumps(mls['model_settings'])}`; `settings.json` `{json.dumps(mls['server_settings'])}`; "
        f"env `{json.dumps(mls['env'])}`.",
        f"- **ModelConfig:** {report['model_config']}",
    ]
    if report.get("tuning"):
        lines += ["", "MLServer settings tried (--tune, medians, best throughput at 32 first):", "",
                  "| max_batch_size | max_batch_time s | parallel_workers | debug | req/s @32 | p99 ms @32 "
                  "| req/s @1 | p50 ms @1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["tuning"]:
            s, c32, c1 = t["settings"], t["results"]["32 in flight"], t["results"]["1 in flight"]
            lines.append(f"| {s['max_batch_size']} | {s['max_batch_time_s']} | {s['parallel_workers']} "
                         f"| {s['debug']} | {c32['rps']:.0f} | {c32['p99_ms']:.2f} | {c1['rps']:.0f} "
                         f"| {c1['p50_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars: throughput, p50 and p99 per load level, ours vs MLServer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    levels = report["levels"]
    x = np.arange(len(levels))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, (("rps", "throughput (req/s)"), ("p50_ms", "p50 latency (ms)"),
                                       ("p99_ms", "p99 latency (ms)")), strict=True):
        for offset, (who, label, color) in ((-0.2, ("ours", "ours (fraud_service)", "tab:blue")),
                                            (0.2, ("mlserver", "MLServer", "tab:orange"))):
            values = [lv[who][key] for lv in levels]
            bars = ax.bar(x + offset, values, 0.4, label=label, color=color)
            ax.bar_label(bars, fmt="%.0f" if key == "rps" else "%.1f", fontsize=8)
        ax.set_xticks(x, [lv["level"] for lv in levels], fontsize=8)
        ax.set_title(title)
        if key != "rps":
            ax.set_yscale("log")
    axes[0].margins(y=0.2)
    axes[0].legend(loc="upper center", ncols=2, fontsize=8)
    fig.suptitle(f"fraud XGBoost: ours vs MLServer (perf_analyzer gRPC, {report['machine']['cpus']} CPUs, "
                 f"medians of {report['rounds']} alternating rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for peer.json / peer.md / peer.png")
    parser.add_argument("--quick", action="store_true", help="1 s windows, 2 rounds (smoke run)")
    parser.add_argument("--tune", action="store_true", help="try MLServer's candidate settings first")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = parser.parse_args(argv)
    report = run(args.out, quick=args.quick, tune_first=args.tune, model_repository=args.model_repository)
    print((args.out / "peer.md").read_text())
    print(f"wrote {args.out}/peer.json, peer.md, peer.png ({report['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
