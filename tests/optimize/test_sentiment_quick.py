"""The toolkit on the Transformer: `--model sentiment --quick --only torch_export,onnx_ortopt,onnx_int8_static`
(the encoder-specific paths: dynamic batch and sequence, transformer fusion, calibrated static INT8 of the
MatMuls with the sensitive ones listed), figures checked against the artefacts in ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sentiment_service import build_model
from sentiment_service.text import TextEncoder
from tests.support.procs import ROOT

ONLY = ("torch_export", "onnx_ortopt", "onnx_int8_static")


@pytest.fixture(scope="module")
def quick(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("optimize-sentiment")
    proc = subprocess.run(
        [sys.executable, "-m", "mlplatform.optimize", "--model", "sentiment", "--quick", "--only", ",".join(ONLY),
         "--out", str(out), "--version-dir", str(model_repository / "sentiment" / "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "sentiment" / "report.json").read_text()), out / "sentiment"


@pytest.fixture(scope="module")
def heldout(model_repository: Path, quick) -> tuple[list[dict], np.ndarray]:
    """The report's held-out rows tokenised here, 16 per batch (padded per batch), and their labels."""
    report, _ = quick
    version = model_repository / "sentiment" / "1"
    params = json.loads((version / "config.json").read_text())["parameters"]
    encoder = TextEncoder(version / params["tokenizer"], int(params["max_sequence_length"]))
    test = [e for e in build_model.load_examples() if e.split == "test"][:report["plan"]["eval_rows"]]
    feeds = []
    for i in range(0, len(test), 16):
        enc = encoder.encode([e.text for e in test[i:i + 16]])
        feeds.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    return feeds, np.array([e.label for e in test])


def run(path: Path, feeds: list[dict]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["probabilities"], f)[0] for f in feeds])


def test_only_the_selected_formats_and_the_references_are_made(quick):
    report, _ = quick
    made = {n for n, r in report["formats"].items() if r["status"] == "ok"}
    assert made == {"eager_fp32", "onnx", *ONLY}
    assert report["formats"]["torchscript"]["status"] == "not selected (--only)"


def test_fp32_formats_match_pytorch_and_the_served_model(quick, heldout, model_repository):
    report, out = quick
    rows = report["formats"]
    feeds, labels = heldout
    served = run(model_repository / "sentiment" / "1" / "model.onnx", feeds)
    accuracy = float((served.argmax(1) == labels).mean())
    assert report["plan"]["eval_rows"] == 64 and accuracy > 0.85
    for name in ("eager_fp32", "onnx", "torch_export", "onnx_ortopt"):
        assert rows[name]["accuracy"] == pytest.approx(accuracy, abs=1e-6), name
        assert rows[name]["agreement"] == 1.0 and rows[name]["max_abs_diff"] <= 1e-4, name
        assert rows[name]["batch_invariant"] is True, name
    assert rows["onnx"]["notes"]["max_abs_diff_vs_pytorch"] <= 1e-4
    assert rows["onnx"]["notes"]["dynamic_axes"]["input_ids"] == ["batch", "sequence"]
    fused = rows["onnx_ortopt"]["notes"]["fused_operators"]
    assert fused["Attention"] == 6 and fused["SkipLayerNormalization"] >= 6  # one per layer of MiniLM-L6
    np.testing.assert_allclose(run(out / rows["onnx_ortopt"]["file"], feeds), served, atol=1e-4)


def test_static_int8_excludes_the_sensitive_matmuls_and_keeps_accuracy(quick, heldout):
    report, out = quick
    rows = report["formats"]
    feeds, labels = heldout
    static = rows["onnx_int8_static"]
    probs = run(out / static["file"], feeds)
    fp32 = run(out / rows["onnx"]["file"], feeds)
    assert static["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-6)
    assert static["agreement"] == pytest.approx(float((probs.argmax(1) == fp32.argmax(1)).mean()), abs=1e-6)
    assert static["accuracy"] >= rows["onnx"]["accuracy"] - 0.035 and static["agreement"] >= 0.95
    assert static["batch_invariant"] is True  # fixed calibrated ranges: a row's answer ignores its batch-mates
    notes = static["notes"]
    assert notes["op_types"] == ["MatMul"] and notes["quantized_nodes"] >= 36  # 6 layers x 6 weight MatMuls
    assert 0 < len(notes["excluded"]) < notes["quantized_nodes"] // 2
    assert all(notes["activation_sqnr_db"][n] < notes["sensitive_threshold_db"] for n in notes["excluded"])
    assert static["size_bytes"] < rows["onnx"]["size_bytes"] * 0.85


def test_installed_into_a_version_the_sentiment_model_serves_the_recommended_variant(quick, model_repository,
                                                                                    tmp_path, heldout):
    """The sentiment CPU path is the toolkit's install: `auto` picks the report's recommendation; the GPU variant
    the build wrote stays; the loaded model's labels are the recommended artefact's."""
    from mlplatform.config import load_config
    from mlplatform.optimize.run import TOOLKIT_DIR, install
    from mlplatform.repository import ModelRepository
    from sentiment_service.model import SentimentModel

    report, out = quick
    src, dst = model_repository / "sentiment" / "1", tmp_path / "sentiment" / "1"
    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "encoder_config.json", "model.torchscript.pt"):
        shutil.copyfile(src / name, dst / name)
    install(report, out, dst)
    config = load_config(dst / "config.json")
    variants = config.runtime.options["variants"]
    recommended = report["recommended"]["cpu"]["format"]
    assert variants["torchscript_fp16"]["target"] == "gpu"  # the build's GPU variant is kept
    assert variants[recommended]["inputs"] == ["input_ids", "attention_mask"]
    assert variants[recommended]["outputs"] == ["probabilities"]
    model = SentimentModel(ModelRepository(tmp_path).resolve("sentiment"))
    assert (model.runtime_name, model.variant_choice.selection) == (recommended, "auto")
    assert model.config.artifact == f"{TOOLKIT_DIR}/{report['formats'][recommended]['file']}"
    model._load()
    test = [e for e in build_model.load_examples() if e.split == "test"][:32]
    got = model.infer({"text": np.array([e.text.encode() for e in test], dtype=object)})["probabilities"]
    feeds, _ = heldout
    want = run(out / report["formats"][recommended]["file"], feeds[:2])
    np.testing.assert_allclose(got, want, atol=1e-5)
