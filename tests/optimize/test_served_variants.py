"""A toolkit run installed into a cnn version: the real cnn service serves the variant the report recommends
(`auto` under the accuracy bound), or any toolkit artefact the config names (here the torch.export program),
and its answers are that artefact's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from mlplatform.backends import select_runtime
from mlplatform.config import load_config
from mlplatform.optimize.run import TOOLKIT_DIR, install
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(cnn_quick, model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose cnn/1 is the project's, with the quick run installed as its runtime variants."""
    report, out = cnn_quick
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(model_repository / "cnn" / "1", repo / "cnn" / "1")
    install(report, out, repo / "cnn" / "1")
    return repo


def serve(repo: Path) -> ServiceProcess:
    return ServiceProcess("cnn_service", "CNN_", env={
        "CNN_MODEL_REPOSITORY": str(repo), "CNN_CACHE_ENABLED": "false", "CNN_LATENCY_BUDGET_MS": "5000"}).start()


@pytest.fixture(scope="module")
def images(model_repository: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(model_repository / "cnn" / "1" / "heldout.npz")
    return data["images"][:32].astype(np.float32)[:, None], data["labels"][:32]


def served(service: ServiceProcess, pixels: np.ndarray) -> tuple[dict[str, str], np.ndarray]:
    """(ModelConfig parameters, probabilities of `pixels`) from the service over the Open Inference Protocol."""
    client = tc.InferenceServerClient(service.target)
    try:
        config = client.get_model_config("cnn", as_json=True)["config"]
        inp = tc.InferInput("image", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        result = client.infer("cnn", [inp], outputs=[tc.InferRequestedOutput("probabilities")])
    finally:
        client.close()
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    params["default_model_filename"] = config["default_model_filename"]
    return params, result.as_numpy("probabilities")


def test_install_lists_every_servable_format_with_its_measurements(installed, cnn_quick):
    report, _ = cnn_quick
    config = json.loads((installed / "cnn" / "1" / "config.json").read_text())
    options = config["runtime"]["options"]
    assert options["variant"] == "auto" and options["auto"]["reference"] == "onnx"
    assert options["auto"]["max_accuracy_drop"] == report["max_accuracy_drop"]
    rows = report["formats"]
    for name, variant in options["variants"].items():
        assert (installed / "cnn" / "1" / variant["artifact"]).is_file(), name
        if variant["target"] == "cpu":
            assert variant["measured"]["accuracy"] == rows[name]["accuracy"]
            assert variant["measured"]["rows_per_s"]["32"] == rows[name]["rows_per_s"]["32"]
    assert {"onnx", "onnx_int8_static", "torch_export", "torchscript", "ort_mobile_int8"} <= set(options["variants"])
    assert options["variants"]["torch_export"]["backend"] == "torch_export"
    cfg = load_config(installed / "cnn" / "1" / "config.json")
    assert select_runtime(cfg, gpu=True)[0].name == "onnx_tensorrt_fp16"
    assert select_runtime(cfg, gpu=False)[0].name == report["recommended"]["cpu"]["format"]


@pytest.fixture(scope="module")
def auto_service(installed) -> Iterator[ServiceProcess]:
    svc = serve(installed)
    yield svc
    svc.stop()


def test_the_service_serves_the_recommended_variant_and_its_answers(auto_service, installed, cnn_quick, images):
    report, _ = cnn_quick
    recommended = report["recommended"]["cpu"]["format"]
    pixels, labels = images
    params, probs = served(auto_service, pixels)
    assert params["runtime_variant"] == recommended and params["runtime_variant_selection"] == "auto"
    assert params["runtime_variant_reason"].startswith("no GPU: ")
    artefact = f"{TOOLKIT_DIR}/{report['formats'][recommended]['file']}"
    assert params["default_model_filename"] == artefact
    session = ort.InferenceSession(str(installed / "cnn" / "1" / artefact), providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"image": pixels})[0]
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() >= 0.9


def test_a_config_can_name_the_torch_export_program(installed, tmp_path, model_repository, images):
    repo = tmp_path / "repo"
    shutil.copytree(installed, repo)
    path = repo / "cnn" / "1" / "config.json"
    config = json.loads(path.read_text())
    config["runtime"]["options"]["variant"] = "torch_export"
    path.write_text(json.dumps(config))
    pixels, _ = images
    svc = serve(repo)
    try:
        params, probs = served(svc, pixels)
    finally:
        svc.stop()
    assert (params["runtime_variant"], params["runtime_variant_selection"]) == ("torch_export", "config")
    assert params["default_model_filename"] == f"{TOOLKIT_DIR}/model.pt2"
    session = ort.InferenceSession(str(model_repository / "cnn" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probs, session.run(["probabilities"], {"image": pixels})[0], atol=1e-5)
