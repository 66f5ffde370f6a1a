"""One toolkit run: make every format of a subject, measure each, compare the edge artefact with the gateway,
recommend, write the report, and optionally install the servable formats as a version's runtime variants."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlplatform.optimize import cloud, report
from mlplatform.optimize.formats import Maker, torch_runner
from mlplatform.optimize.measure import Bench, Plan, predict
from mlplatform.optimize.subject import load_subject


@dataclass(frozen=True)
class Options:
    model: str
    out: str = "build/optimize"
    subject: str | None = None
    version_dir: str | None = None
    quick: bool = False
    aoti: bool = True
    threads: int = 2
    max_accuracy_drop: float = 0.01
    gateway: str | None = None
    token: str | None = None
    stack: bool = False
    repository: str = "model_repository"
    install: str | None = None
    gateway_requests: int = 100
    only: tuple[str, ...] = ()
    """Make only these formats (and the FP32 references eager_fp32 and onnx); empty: all."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plan_for(opts: Options, extra: dict[str, Any]) -> Plan:
    if opts.quick:
        return Plan(eval_rows=extra.get("quick_eval_rows", 128), latency_rows=40, throughput_rows=64, rounds=1,
                    threads=opts.threads)
    return Plan(eval_rows=10**9, latency_rows=extra.get("latency_rows", 200),
                throughput_rows=extra.get("throughput_rows", 128), rounds=3, threads=opts.threads)


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    from mlplatform.variants import gpu_available

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "gpu": gpu_available(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def run(opts: Options) -> dict[str, Any]:
    """Run the toolkit; returns the report (also written to `<out>/<model>/`)."""
    import torch

    started = datetime.now(UTC).isoformat(timespec="seconds")
    kwargs = {"version_dir": opts.version_dir} if opts.version_dir else {}
    subject = load_subject(opts.model, opts.subject, **kwargs)
    out = Path(opts.out) / subject.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    extra = subject.extra
    plan = plan_for(opts, extra)
    bench = Bench(subject, plan)
    torch.set_num_threads(opts.threads)
    bench.reference = predict(torch_runner(subject, subject.net)(opts.threads), bench.eval_batches)
    steps = int(extra.get("quick_finetune_steps", 8)) if opts.quick else int(extra.get("finetune_steps", 100))
    maker = Maker(subject, out, calibration_rows=32 if opts.quick else 128, probe_rows=16 if opts.quick else 64,
                  finetune_steps=steps, only=opts.only)
    tolerance = float(extra.get("parity_tolerance", 1e-4))
    log(f"{subject.name}: native formats")
    maker.native()
    log(f"{subject.name}: torch.export" + (" + AOTInductor" if opts.aoti and not opts.quick else ""))
    maker.exported(aoti=opts.aoti and not opts.quick)
    log(f"{subject.name}: ONNX, ORT optimisations, INT8")
    maker.onnx_family(bench.max_diff, tolerance)
    log(f"{subject.name}: pruning ({steps} fine-tune steps each)")
    maker.pruning(bench.accuracy)
    maker.tensorrt()
    log(f"{subject.name}: edge formats")
    maker.edge()
    rows: dict[str, dict[str, Any]] = {
        name: {"description": art.description, "family": art.family, "file": art.file, "size_bytes": maker.size(art),
               "status": art.status, "backend": art.backend, "target": art.target, "make_seconds": art.seconds,
               "notes": art.notes} for name, art in maker.artefacts.items()}

    def failed(name: str, exc: Exception) -> None:  # keep the row, say why it has no figures
        rows[name]["status"] = f"failed to run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    runnable = {n: a.runner for n, a in maker.artefacts.items() if a.ok and a.runner is not None}
    log(f"{subject.name}: measuring {len(runnable)} formats ({plan.rounds} interleaved timing rounds)")
    for name, figures in bench.measure_all(runnable, failed).items():
        rows[name].update(figures)
    result: dict[str, Any] = {
        "model": subject.name, "description": subject.description, "started": started, "quick": opts.quick,
        "machine": machine(), "plan": {**plan.__dict__, "eval_rows": len(bench.labels)},
        "max_accuracy_drop": opts.max_accuracy_drop,
        "reference": report.REFERENCE, "formats": rows, "out": str(out),
        "input_names": subject.input_names, "output_names": subject.output_names,
    }
    if opts.only:
        result["only"] = list(opts.only)
    result["recommended"] = report.recommend(rows, opts.max_accuracy_drop, gpu=result["machine"]["gpu"])
    result["cloud"] = cloud_figures(opts, subject, maker, rows, result["recommended"]["edge"]["format"])
    report.write(result, out)
    if opts.install:
        install(result, out, Path(opts.install))
    log(f"{subject.name}: done in {out}")
    return result


def cloud_figures(opts: Options, subject: Any, maker: Maker, rows: dict[str, Any], edge: str) -> dict[str, Any]:
    """The edge artefact beside the gateway, or why not."""
    if opts.quick:
        return {"status": "skipped in quick mode"}
    if not edge:
        return {"status": "no edge artefact within the accuracy bound"}
    if not (opts.gateway or opts.stack):
        return {"status": "no gateway given (--gateway URL --token T, or --stack)"}
    art = maker.artefacts[edge]
    assert art.runner is not None
    delay = (subject.extra.get("batching") or {}).get("max_queue_delay_ms")
    run_one = art.runner(1)
    n = min(opts.gateway_requests, len(subject.labels))
    edge_labels = [int(run_one(subject.heldout([i])).argmax(1)[0]) for i in range(n)]
    try:
        if opts.gateway:
            ms, labels = cloud.through_gateway(subject, opts.gateway, str(opts.token), n)
            return cloud.compare(rows[edge], edge, edge_labels, ms, labels, opts.gateway, delay)
        log(f"{subject.name}: starting the platform on loopback for the cloud comparison")
        with cloud.start_stack(subject.name, Path(opts.repository)) as (url, token):
            ms, labels = cloud.through_gateway(subject, url, token, n)
        return cloud.compare(rows[edge], edge, edge_labels, ms, labels, url + " (started by --stack)", delay)
    except Exception as exc:  # the report still has every other figure
        return {"status": f"failed: {type(exc).__name__}: {exc}"}


TOOLKIT_DIR = "toolkit"


def install(result: dict[str, Any], out: Path, version_dir: Path) -> dict[str, Any]:
    """Copy the servable formats into `version_dir/toolkit/` and make them the version's runtime variants:
    `variant: auto` under the run's accuracy bound (`mlplatform.variants`), GPU variants the config already
    had are kept. Returns the new config."""
    config_path = version_dir / "config.json"
    config = json.loads(config_path.read_text())
    dest = version_dir / TOOLKIT_DIR
    dest.mkdir(exist_ok=True)
    variants = report.served_variants(result["formats"])
    # The runtime's tensors when they are not the served ones (text in, token ids to the runtime).
    io_names = {key: result[f"{key[:-1]}_names"] for key in ("inputs", "outputs")
                if result[f"{key[:-1]}_names"] != [t["name"] for t in config[key]]}
    for entry in variants.values():
        shutil.copyfile(out / entry["artifact"], dest / entry["artifact"])
        entry["artifact"] = f"{TOOLKIT_DIR}/{entry['artifact']}"
        entry.update(io_names)
    shutil.copyfile(out / "report.json", dest / "report.json")
    options = config.setdefault("runtime", {}).setdefault("options", {})
    kept = {n: v for n, v in (options.get("variants") or {}).items() if v.get("target") == "gpu"}
    trt = variants.pop("onnx_tensorrt_fp16", None)
    if trt is None and not kept:
        variants["onnx_tensorrt_fp16"] = {"backend": "onnxruntime", "artifact": f"{TOOLKIT_DIR}/model.onnx",
                                          "target": "gpu", "description": "TensorRT FP16 via ORT (not measured)",
                                          **io_names}
    elif trt is not None:
        variants["onnx_tensorrt_fp16"] = trt
    options["variants"] = {**kept, **variants}
    options["variant"] = "auto"
    options["auto"] = {"reference": report.REFERENCE, "max_accuracy_drop": result["max_accuracy_drop"],
                       "require_batch_invariant": True, "table": f"{TOOLKIT_DIR}/report.json"}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log(f"installed {len(variants)} variants into {version_dir} (auto under a "
        f"{result['max_accuracy_drop'] * 100:g}-point bound)")
    return config
