"""The toolkit's report: recommendations under an accuracy bound, `report.json`, `report.md` and plots."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlplatform.variants import choose_variant, speed_score

REFERENCE = "onnx"
"""The FP32 format the accuracy bound compares with (the served reference in `runtime.options.auto`)."""


def rates(row: Mapping[str, Any]) -> dict[str, float]:
    """A row's speed as `measured.rows_per_s`: batch 1 from its one-thread p50, batch 8 and 32 measured."""
    return {"1": round(1000.0 / row["p50_ms"], 1), **row["rows_per_s"]}


def served_variants(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The servable formats as `runtime.options.variants` entries (artifact relative to the report's directory)."""
    out: dict[str, dict[str, Any]] = {}
    for name, row in rows.items():
        if row.get("backend") is None or row["status"] != "ok":
            continue
        entry: dict[str, Any] = {"backend": row["backend"], "artifact": row["file"], "target": row["target"],
                                 "description": row["description"]}
        if row["target"] == "cpu" and "accuracy" in row:
            entry["measured"] = {"accuracy": row["accuracy"], "batch_invariant": row["batch_invariant"],
                                 "rows_per_s": rates(row)}
        out[name] = entry
    return out


def recommend(rows: Mapping[str, Mapping[str, Any]], max_drop: float, gpu: bool) -> dict[str, dict[str, str]]:
    """What to ship on CPU (the serving rule itself, `mlplatform.variants.choose_variant`, over every servable
    format: what `install` makes the version serve), on GPU and on edge (the fastest .ort within the bound)."""
    rule = {"reference": REFERENCE, "max_accuracy_drop": max_drop, "require_batch_invariant": True}
    variants = served_variants(rows)
    rec: dict[str, dict[str, str]] = {}
    cpu = {n: v for n, v in variants.items() if v["target"] == "cpu"}
    try:
        choice = choose_variant(cpu, rule, gpu=False)
        rec["cpu"] = {"format": choice.name, "why": choice.reason}
    except ValueError as exc:
        rec["cpu"] = {"format": "", "why": str(exc)}
    trt = rows.get("onnx_tensorrt_fp16", {})
    if trt.get("status") == "ok":
        rec["gpu"] = {"format": "onnx_tensorrt_fp16", "why": "measured on this machine's GPU"}
    else:
        rec["gpu"] = {"format": "onnx_tensorrt_fp16",
                      "why": "not measured here (" + str(trt.get("status", "not tried")) + "); the FP32 ONNX "
                             "artefact through ONNX Runtime's TensorRT provider in FP16, as the served config lists"}
    ref = rows[REFERENCE]["accuracy"]
    edge = [n for n, r in rows.items() if r["family"] == "edge" and r["status"] == "ok"
            and r["accuracy"] >= ref - max_drop - 1e-9]
    if edge:
        best = min(edge, key=lambda n: (rows[n]["p50_ms"], rows[n]["size_bytes"]))
        r = rows[best]
        rec["edge"] = {"format": best, "why": f"lowest one-thread batch-1 p50 ({r['p50_ms']:.2f} ms) among the "
                       f".ort artefacts within {max_drop * 100:g} point(s) of FP32 ({r['accuracy']:.4f} vs {ref:.4f}), "
                       f"{r['size_bytes'] / 1e6:.2f} MB"}
    else:
        rec["edge"] = {"format": "", "why": "no .ort artefact within the accuracy bound"}
    return rec


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the table of every format, the recommendations, INT8, pruning and the cloud figures."""
    rows = report["formats"]
    ref = rows[REFERENCE].get("accuracy")
    m = report["machine"]
    lines = [f"# Optimisation report: {report['model']}", "",
             f"{report['description']}. Run {report['started']} on {m['cpus']} CPU(s) ({m['processor']}), "
             f"GPU: {'yes' if m['gpu'] else 'no'}; torch {m['torch']}, onnxruntime {m['onnxruntime']}"
             f"{' (quick mode)' if report['quick'] else ''}. Held-out rows: {report['plan']['eval_rows']}; "
             f"latency: {report['plan']['latency_rows']} single-row calls on 1 thread; throughput: "
             f"{report['plan']['throughput_rows']} rows in batches of 8 and 32 on {report['plan']['threads']} "
             f"thread(s); each call's best of {report['plan']['rounds']} rounds, the formats taking turns.", "",
             "| format | what | size MB | held-out acc | Δ vs ONNX FP32 (pts) | agreement | max abs Δp | "
             "p50 ms (b1, 1 thr) | p99 ms | rows/s b8 | rows/s b32 | batch-invariant |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['description']} | {_mb(r.get('size_bytes'))} | {r['status']} "
                         "| | | | | | | | |")
            continue
        rps = r["rows_per_s"]
        lines.append(
            f"| {name} | {r['description']} | {_mb(r['size_bytes'])} | {r['accuracy']:.4f} | "
            f"{(r['accuracy'] - ref) * 100:+.2f} | {r['agreement']:.4f} | {r['max_abs_diff']:.2e} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {rps['8']:,.0f} | {rps['32']:,.0f} | "
            f"{'yes' if r['batch_invariant'] else 'no'} |")
    lines += ["", f"## Recommended (accuracy bound: {report['max_accuracy_drop'] * 100:g} point(s) below ONNX FP32)",
              ""]
    lines += [f"- **{t}**: `{r['format']}`: {r['why']}" for t, r in report["recommended"].items()]
    static = rows.get("onnx_int8_static", {}).get("notes", {})
    if static:
        lines += ["", "## INT8 with calibration", "",
                  f"{static.get('format')}; calibration: {static.get('calibration')}. "
                  f"{len(static.get('excluded', []))} of {static.get('quantized_nodes')} quantisable nodes "
                  f"({', '.join(static.get('op_types', []))}) kept in FP32 (activation SQNR under "
                  f"{static.get('sensitive_threshold_db')} dB): {', '.join(static.get('excluded', [])) or 'none'}."]
        for name in ("onnx_int8_static", "onnx_int8_dynamic"):
            r = rows.get(name, {})
            if r.get("status") == "ok":
                lines.append(f"- {name}: accuracy {r['accuracy']:.4f} ({(r['accuracy'] - ref) * 100:+.2f} pts), "
                             f"agreement {r['agreement']:.4f}, {_mb(r['size_bytes'])} MB, p50 {r['p50_ms']:.3f} ms")
    lines += ["", "## Pruning", ""]
    for name in ("pruned_50_unstructured", "pruned_structured"):
        r = rows.get(name, {})
        n = r.get("notes", {})
        if r.get("status") != "ok":
            lines.append(f"- {name}: {r.get('status', 'not run')}")
            continue
        extra = (f"sparsity {n['sparsity']:.1%}, gzip {n['gzip_bytes'] / 1e6:.2f} MB vs dense "
                 f"{n['gzip_bytes_dense'] / 1e6:.2f} MB; " if "sparsity" in n else
                 f"parameters {n['parameters']:,} vs {n['parameters_fp32']:,}; ")
        speed = (f"p50 {r['p50_ms']:.3f} ms vs {rows[REFERENCE]['p50_ms']:.3f} ms, rows/s b32 "
                 f"{r['rows_per_s']['32']:,.0f} vs {rows[REFERENCE]['rows_per_s']['32']:,.0f}")
        lines.append(f"- {name}: {n['method']}. Accuracy {ref:.4f} (FP32) -> "
                     f"{n['accuracy_pruned_before_finetune']:.4f} after pruning -> "
                     f"{n['accuracy_pruned_after_finetune']:.4f} after the fine-tune (ONNX Runtime: "
                     f"{r['accuracy']:.4f}); {extra}{speed}.")
    cloud = report.get("cloud")
    lines += ["", "## On-device stand-in vs the cloud API", ""]
    if cloud and cloud.get("status") == "ok":
        lines.append(
            f"Edge artefact `{cloud['edge_format']}` in-process, 1 thread, no batching: "
            f"p50 {cloud['edge_p50_ms']:.2f} ms, "
            f"p99 {cloud['edge_p99_ms']:.2f} ms. The same {cloud['requests']} predictions through the gateway "
            f"({cloud['url']}, REST, one at a time, same run): p50 {cloud['gateway_p50_ms']:.2f} ms, "
            f"p99 {cloud['gateway_p99_ms']:.2f} ms. The gateway path adds {cloud['added_p50_ms']:.2f} ms at p50 on "
            f"loopback (Envoy, JWT, transcoding, the service's batcher and runtime"
            + (f"; the batcher waits up to {cloud['batching_delay_ms']:g} ms for batch-mates, which a lone client "
               "never has" if cloud.get("batching_delay_ms") else "")
            + f"); a real network adds its round "
            f"trip on top: {cloud['rtt_note']}. Answers agree on {cloud['agreement']:.1%} of the rows.")
    else:
        lines.append(f"Not measured in this run: {(cloud or {}).get('status', 'no gateway (quick mode)')}.")
    lines += ["", "## Not done here", ""]
    lines += [f"- {n}: {r['status']}" for n, r in rows.items() if r["status"] != "ok"]
    td = rows.get("torchscript", {}).get("notes", {}).get("deprecation_warnings")
    if td:
        lines += ["", "TorchScript deprecation warnings seen while tracing / loading: " + "; ".join(td)]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", []))]
    return "\n".join(lines) + "\n"


def plots(report: Mapping[str, Any], out: Path) -> list[str]:
    """Size / latency / throughput bars and accuracy vs latency (PNG); the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in report["formats"].items() if r["status"] == "ok"}
    names = list(rows)
    model = report["model"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(names) + 2), sharey=True)
    for ax, (title, values) in zip(axes, (
            ("size (MB)", [rows[n]["size_bytes"] / 1e6 for n in names]),
            ("p50 latency, batch 1, 1 thread (ms)", [rows[n]["p50_ms"] for n in names]),
            ("rows/s at batch 32", [rows[n]["rows_per_s"]["32"] for n in names])), strict=True):
        ax.barh(names, values, color=["#888" if rows[n]["family"] == "native" else "#37c" for n in names])
        ax.set_title(title, fontsize=10)
    axes[0].invert_yaxis()  # shared y: the first format on top
    fig.suptitle(f"{model}: every format")
    fig.tight_layout()
    bars = f"{model}_formats.png"
    fig.savefig(out / bars, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 5))
    markers = "os^Dv<>Ph*Xd"
    for i, n in enumerate(names):
        ax.scatter(rows[n]["p50_ms"], rows[n]["accuracy"] * 100, s=max(20.0, rows[n]["size_bytes"] / 1e6 * 3),
                   marker=markers[i % len(markers)], alpha=0.75, label=n)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=0.6)
    ax.axhline((rows[REFERENCE]["accuracy"] - report["max_accuracy_drop"]) * 100, ls="--", color="#c33", lw=1)
    ax.set_xlabel("p50 latency, batch 1, 1 thread (ms)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{model}: accuracy vs latency (dot area ~ size; dashed: accuracy bound)")
    fig.tight_layout()
    scatter = f"{model}_accuracy_latency.png"
    fig.savefig(out / scatter, dpi=90)
    plt.close(fig)
    return [bars, scatter]


def write(report: dict[str, Any], out: Path) -> None:
    """report.json, the plots and report.md into `out`."""
    try:
        report["plots"] = plots(report, out)
    except Exception as exc:  # a plot is not worth losing the report for
        report["plots"] = []
        report["plot_error"] = str(exc)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))


def score(row: Mapping[str, Any]) -> float:
    """The serving rule's speed score of a row (geometric mean of rows/s at batch 1, 8, 32)."""
    return speed_score({"rows_per_s": rates(row)})
