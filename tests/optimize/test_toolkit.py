"""`python -m mlplatform.optimize --model cnn --quick`: every format made and measured, figures checked against
the artefacts themselves (ONNX Runtime in the test), the INT8 and pruning figures, the report and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

FP32_EXACT = ("eager_fp32", "torchscript", "torch_export", "onnx", "onnx_ortopt", "ort_mobile_fp32")
MEASURED = (*FP32_EXACT, "onnx_int8_dynamic", "onnx_int8_static", "pruned_50_unstructured", "pruned_structured",
            "ort_mobile_int8")


@pytest.fixture(scope="module")
def heldout(model_repository: Path, cnn_quick) -> tuple[np.ndarray, np.ndarray]:
    report, _ = cnn_quick
    data = np.load(model_repository / "cnn" / "1" / "heldout.npz")
    n = report["plan"]["eval_rows"]
    return data["images"][:n].astype(np.float32)[:, None], data["labels"][:n]


def probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": images})[0]


def test_every_format_is_made_and_measured(cnn_quick):
    report, out = cnn_quick
    rows = report["formats"]
    for name in MEASURED:
        row = rows[name]
        assert row["status"] == "ok", (name, row["status"])
        assert (out / row["file"]).is_file() and row["size_bytes"] == (out / row["file"]).stat().st_size
        assert row["eval_rows"] == report["plan"]["eval_rows"] == 128
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["latency_calls"] == 40
        assert set(row["rows_per_s"]) == {"8", "32"} and all(r > 0 for r in row["rows_per_s"].values())
    assert rows["aoti"]["status"].startswith("skipped")
    assert rows["onnx_tensorrt_fp16"]["status"].startswith("not available on this machine")
    assert rows["tflite"]["status"].startswith("not done") and rows["coreml"]["status"].startswith("not done")
    assert any("torch.jit.trace" in w for w in rows["torchscript"]["notes"]["deprecation_warnings"])


def test_fp32_formats_agree_with_pytorch(cnn_quick, model_repository, heldout):
    report, _ = cnn_quick
    rows = report["formats"]
    images, labels = heldout
    recorded = probabilities(model_repository / "cnn" / "1" / "model.onnx", images)
    accuracy = float((recorded.argmax(1) == labels).mean())
    assert accuracy > 0.95
    for name in FP32_EXACT:
        assert rows[name]["accuracy"] == pytest.approx(accuracy, abs=1e-6), name
        assert rows[name]["agreement"] == 1.0 and rows[name]["max_abs_diff"] <= 1e-4, name
        assert rows[name]["batch_invariant"] is True, name
    assert rows["onnx"]["notes"]["max_abs_diff_vs_pytorch"] <= rows["onnx"]["notes"]["tolerance"] == 1e-4
    assert rows["onnx"]["notes"]["dynamic_axes"]["image"] == ["batch"]


def test_static_int8_is_calibrated_per_channel_and_its_figures_are_the_artefacts(cnn_quick, heldout):
    report, out = cnn_quick
    rows = report["formats"]
    images, labels = heldout
    static = rows["onnx_int8_static"]
    probs = probabilities(out / static["file"], images)
    fp32 = probabilities(out / rows["onnx"]["file"], images)
    assert static["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-6)
    assert static["agreement"] == pytest.approx(float((probs.argmax(1) == fp32.argmax(1)).mean()), abs=1e-6)
    assert static["accuracy"] >= rows["onnx"]["accuracy"] - 0.02 and static["agreement"] >= 0.97
    assert 0 < static["max_abs_diff"] < 0.2 and static["batch_invariant"] is True
    notes = static["notes"]
    assert notes["quantized_nodes"] == len(notes["activation_sqnr_db"]) >= 4  # 3 convs + the head
    assert all(notes["activation_sqnr_db"][n] < notes["sensitive_threshold_db"] for n in notes["excluded"])
    assert all(db >= notes["sensitive_threshold_db"] for n, db in notes["activation_sqnr_db"].items()
               if n not in notes["excluded"])
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / static["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert static["size_bytes"] < rows["onnx"]["size_bytes"] * 0.6
    dynamic = rows["onnx_int8_dynamic"]
    assert dynamic["accuracy"] >= rows["onnx"]["accuracy"] - 0.03 and dynamic["size_bytes"] < static["size_bytes"] * 1.5


def test_pruning_reports_sparsity_and_accuracy_before_and_after(cnn_quick, heldout):
    report, out = cnn_quick
    rows = report["formats"]
    images, labels = heldout
    unstructured = rows["pruned_50_unstructured"]
    notes = unstructured["notes"]
    assert notes["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert notes["accuracy_fp32"] == rows["eager_fp32"]["accuracy"]
    assert notes["accuracy_pruned_after_finetune"] == pytest.approx(unstructured["accuracy"], abs=1e-6)
    assert unstructured["accuracy"] >= rows["onnx"]["accuracy"] - 0.05
    assert notes["gzip_bytes"] < notes["gzip_bytes_dense"]  # zeros compress; dense kernels stay as big
    probs = probabilities(out / unstructured["file"], images)
    assert unstructured["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-6)
    structured = rows["pruned_structured"]
    s_notes = structured["notes"]
    assert s_notes["parameters"] < s_notes["parameters_fp32"] * 0.4  # half the channels: ~1/3 of the weights
    assert "16->8, 32->16, 64->32" in s_notes["method"]
    assert s_notes["accuracy_pruned_after_finetune"] > s_notes["accuracy_pruned_before_finetune"]
    assert structured["accuracy"] >= 0.9 and structured["size_bytes"] < rows["onnx"]["size_bytes"] * 0.5


def _score(row: dict) -> float:
    rates = [1000.0 / row["p50_ms"], *row["rows_per_s"].values()]
    return math.exp(sum(math.log(r) for r in rates) / len(rates))


def test_the_recommendations_follow_the_accuracy_bound(cnn_quick):
    report, _ = cnn_quick
    rows = report["formats"]
    floor = rows["onnx"]["accuracy"] - report["max_accuracy_drop"]
    servable = {n: r for n, r in rows.items() if r["status"] == "ok" and r["backend"] and r["target"] == "cpu"}
    allowed = {n: r for n, r in servable.items() if r["accuracy"] >= floor - 1e-9 and r["batch_invariant"]}
    rec = report["recommended"]
    assert rec["cpu"]["format"] == max(allowed, key=lambda n: _score(allowed[n]))
    edge = {n: r for n, r in rows.items() if r["family"] == "edge" and r["status"] == "ok" and r["accuracy"] >= floor}
    assert rec["edge"]["format"] == min(edge, key=lambda n: (edge[n]["p50_ms"], edge[n]["size_bytes"]))
    assert rec["gpu"]["format"] == "onnx_tensorrt_fp16" and "not measured here" in rec["gpu"]["why"]


def test_report_markdown_and_plots(cnn_quick):
    report, out = cnn_quick
    md = (out / "report.md").read_text()
    for name in MEASURED:
        assert f"| {name} |" in md
    assert f"{report['formats']['onnx_int8_static']['accuracy']:.4f}" in md
    assert "## INT8 with calibration" in md and "## Pruning" in md and "skipped in quick mode" in md
    assert len(report["plots"]) == 2
    for plot in report["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
