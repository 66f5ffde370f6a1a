"""mlplatform.runtimes.onnx: execution-provider selection and a real ONNX Runtime session on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mlplatform.backends import OnnxModel
from mlplatform.repository import ModelRepository
from mlplatform.runtimes.onnx import CPU, CUDA, DEFAULT_PREFERENCE, TENSORRT, OnnxRuntimeSession, select_providers


def build_affine_model(path: Path, features: int = 3) -> Path:
    """y = x * 2 + 1 and s = sum(x, axis=1), with a dynamic batch dimension N."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"]),
        ],
        initializer=[two, one, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mlplatform-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def affine_model(tmp_path_factory) -> Path:
    return build_affine_model(tmp_path_factory.mktemp("onnx") / "affine.onnx")


# -- select_providers --------------------------------------------------------------------------

def test_tensorrt_first_with_its_options():
    trt_options = {"trt_fp16_enable": True, "trt_engine_cache_path": "/tmp/trt"}
    chosen = select_providers([TENSORRT, CUDA, CPU], options={TENSORRT: trt_options})
    assert chosen == [(TENSORRT, trt_options), (CUDA, {}), (CPU, {})]
    assert chosen[0][1] is not trt_options  # a copy: ORT may not mutate the config


def test_cuda_then_cpu():
    assert select_providers([CUDA, CPU]) == [(CUDA, {}), (CPU, {})]
    assert select_providers([CPU, CUDA, "AzureExecutionProvider"]) == [(CUDA, {}), (CPU, {})]


def test_cpu_only():
    assert select_providers([CPU]) == [(CPU, {})]
    assert select_providers(["AzureExecutionProvider", CPU]) == [(CPU, {})]


def test_cpu_is_added_even_when_not_listed():
    assert select_providers([]) == [(CPU, {})]
    assert select_providers([TENSORRT, CUDA, CPU], preferred=[CUDA]) == [(CUDA, {}), (CPU, {})]


@pytest.mark.parametrize(
    "preferred",
    [None, [CPU, CUDA], [CUDA, CPU, TENSORRT], [CPU], [TENSORRT, CPU, CUDA]],
)
def test_cpu_is_always_last_and_once(preferred):
    chosen = [name for name, _ in select_providers([TENSORRT, CUDA, CPU], preferred)]
    assert chosen[-1] == CPU
    assert chosen.count(CPU) == 1


def test_custom_preference_is_honoured():
    available = [TENSORRT, CUDA, CPU]
    assert [p for p, _ in select_providers(available, [CUDA, TENSORRT])] == [CUDA, TENSORRT, CPU]
    assert [p for p, _ in select_providers(available, [CPU])] == [CPU]
    # unavailable preferred providers are skipped
    assert [p for p, _ in select_providers([CPU], ["ROCMExecutionProvider", CUDA])] == [CPU]


def test_duplicates_are_asked_for_once():
    assert select_providers([CUDA, CPU], [CUDA, CUDA, CPU, CPU]) == [(CUDA, {}), (CPU, {})]


def test_default_preference_is_tensorrt_cuda_cpu():
    assert DEFAULT_PREFERENCE == (TENSORRT, CUDA, CPU)
    assert select_providers([CPU, CUDA, TENSORRT], []) == select_providers([CPU, CUDA, TENSORRT])


def test_options_for_unchosen_providers_are_ignored():
    chosen = select_providers([CPU], options={TENSORRT: {"trt_fp16_enable": True}, CPU: {"arena": "1"}})
    assert chosen == [(CPU, {"arena": "1"})]


@pytest.mark.parametrize("bad", ["cuda", "TensorRT", "CPU"])
def test_non_provider_names_are_refused(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        select_providers([TENSORRT, CUDA, CPU], [CUDA, bad])


# -- OnnxRuntimeSession ------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 5, 64])
def test_session_runs_the_model(affine_model, rows):
    session = OnnxRuntimeSession(affine_model, providers=[CPU])
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) / 4 - 3
    out = session.run({"x": x})
    assert list(out) == ["y", "s"]
    np.testing.assert_allclose(out["y"], x * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(out["s"], x.sum(axis=1), rtol=1e-5)
    assert out["y"].dtype == np.float32 and out["y"].shape == (rows, 3)
    assert out["s"].shape == (rows,)


def test_session_metadata_and_device(affine_model):
    session = OnnxRuntimeSession(affine_model, providers=[CPU], intra_op_threads=2, inter_op_threads=1)
    assert session.input_names == ["x"]
    assert session.output_names == ["y", "s"]
    assert session.requested_providers == [CPU]
    assert session.providers == ["CPUExecutionProvider"]
    assert session.device == "cpu"
    assert session.session.get_session_options().intra_op_num_threads == 2


@pytest.mark.skipif(
    bool({TENSORRT, CUDA} & set(ort.get_available_providers())),
    reason="this onnxruntime offers GPU providers",
)
def test_default_providers_on_a_cpu_only_onnxruntime(affine_model):
    session = OnnxRuntimeSession(affine_model)
    assert session.providers == ["CPUExecutionProvider"]
    assert session.requested_providers == ["CPUExecutionProvider"]
    assert session.device == "cpu"


def test_session_rejects_a_missing_artifact(tmp_path):
    with pytest.raises(Exception, match=r"model\.onnx"):
        OnnxRuntimeSession(tmp_path / "model.onnx", providers=[CPU])


# -- OnnxModel on a repository built around the tiny model -------------------------------------

def _repository(root: Path, model_path: Path, inputs=None, outputs=None) -> ModelRepository:
    version_dir = root / "affine" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(model_path.read_bytes())
    cfg = {
        "name": "affine", "version": 1, "platform": "onnxruntime_onnx", "artifact": "model.onnx",
        "inputs": inputs or [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": outputs or [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "s", "datatype": "FP32", "shape": [-1]}],
        "batching": {"max_batch_size": 16},
        "runtime": {"providers": [CPU]},
        "warmup": {"batch_sizes": [1, 16], "iterations": 1},
    }
    (version_dir / "config.json").write_text(json.dumps(cfg))
    return ModelRepository(root)


async def test_onnx_model_loads_warms_up_and_infers(tmp_path, affine_model):
    model = OnnxModel(_repository(tmp_path, affine_model).resolve("affine"))
    assert not model.ready
    await model.load()
    await model.warmup()
    assert model.ready
    assert model.providers == ["CPUExecutionProvider"] and model.device == "cpu"
    x = np.array([[1, 2, 3], [-1, 0, 0.5]], dtype=np.float32)
    out = model.infer({"x": x})
    np.testing.assert_allclose(out["y"], x * 2 + 1)
    np.testing.assert_allclose(out["s"], [6, -0.5])
    await model.unload()
    assert not model.ready and not hasattr(model, "session")


async def test_onnx_model_refuses_a_config_that_disagrees_with_the_artifact(tmp_path, affine_model):
    repo = _repository(tmp_path, affine_model, inputs=[{"name": "features", "datatype": "FP32", "shape": [-1, 3]}])
    with pytest.raises(ValueError, match=r"artifact inputs \['x'\] differ from config inputs \['features'\]"):
        await OnnxModel(repo.resolve("affine")).load()
