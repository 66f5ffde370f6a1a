"""mlplatform.repository: version resolution and config validation on a repository built in tmp_path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from mlplatform.config import load_config
from mlplatform.errors import NotFoundError
from mlplatform.repository import ModelRepository


def config(name: str = "toy", version: int = 1, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name,
        "version": version,
        "platform": "onnxruntime_onnx",
        "artifact": "model.onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        "batching": {"max_batch_size": 8, "max_queue_delay_ms": 1.0, "preferred_batch_sizes": [4, 8]},
        "warmup": {"batch_sizes": [1, 8], "iterations": 2},
        "parameters": {"threshold": 0.5},
    }
    cfg.update(changes)
    return cfg


def add_version(root: Path, model: str, version: int | str, cfg: dict[str, Any] | None = None,
                artifact: bool = True) -> Path:
    path = root / model / str(version)
    path.mkdir(parents=True)
    cfg = cfg if cfg is not None else config(model, int(version))
    (path / "config.json").write_text(json.dumps(cfg))
    if artifact:
        (path / cfg.get("artifact", "model.onnx")).write_bytes(b"not really onnx")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    """toy v1, v2, v10 (numeric, not lexical, order), plus directories that are not versions."""
    for v in (1, 2, 10):
        add_version(tmp_path, "toy", v)
    (tmp_path / "toy" / "0").mkdir()
    (tmp_path / "toy" / "0" / "config.json").write_text(json.dumps(config("toy", 1)))
    (tmp_path / "toy" / "latest").mkdir()
    (tmp_path / "toy" / "7").mkdir()  # no config.json
    (tmp_path / "toy" / "README").write_text("notes")
    add_version(tmp_path, "other", 4)
    return ModelRepository(tmp_path)


def test_versions_are_numeric_and_need_a_config(repo):
    assert repo.versions("toy") == [1, 2, 10]
    assert repo.versions("other") == [4]
    assert repo.versions("missing") == []


def test_newest_version_is_chosen(repo):
    mv = repo.resolve("toy")
    assert mv.config.version == 10
    assert mv.path == repo.root / "toy" / "10"
    assert mv.artifact_path == repo.root / "toy" / "10" / "model.onnx"
    assert mv.artifact_path.is_file()


def test_pinned_version_is_honoured(repo):
    mv = repo.resolve("toy", 2)
    assert mv.config.version == 2
    assert mv.path.name == "2"


def test_config_is_parsed(repo):
    cfg = repo.resolve("toy", 1).config
    assert cfg.name == "toy" and cfg.platform == "onnxruntime_onnx"
    assert [(s.name, s.datatype, s.shape) for s in cfg.inputs] == [("x", "FP32", (-1, 3))]
    assert cfg.inputs[0].numpy_dtype.str == "<f4"
    assert cfg.batching.max_batch_size == 8
    assert cfg.batching.max_queue_size == 1024  # default
    assert cfg.batching.preferred_batch_sizes == [4, 8]
    assert cfg.warmup.batch_sizes == [1, 8] and cfg.warmup.iterations == 2
    assert cfg.runtime.intra_op_threads == 1 and cfg.runtime.providers is None
    assert cfg.parameters == {"threshold": 0.5}


def test_unknown_version_lists_the_available_ones(repo):
    with pytest.raises(NotFoundError) as err:
        repo.resolve("toy", 3)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "no version 3" in err.value.message
    assert "[1, 2, 10]" in err.value.message


def test_unknown_model_lists_the_available_models(repo):
    with pytest.raises(NotFoundError) as err:
        repo.resolve("toys")
    assert "'toys'" in err.value.message
    assert "['other', 'toy']" in err.value.message


def test_missing_repository_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="'toy'"):
        ModelRepository(tmp_path / "nowhere").resolve("toy")


def _invalid(**changes: Any) -> dict[str, Any]:
    return config("toy", 1, **changes)


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(config("toy", 1))
    target = cfg
    for key in path[:-1]:
        target = target[key] if not isinstance(target, list) else target[int(key)]
    target[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    ("cfg", "problem"),
    [
        (_invalid(colour="blue"), "colour"),
        (_nested(("batching", "max_batch_sise"), 4), "max_batch_sise"),
        (_nested(("inputs", "0", "datatype"), "FLOAT32"), "unknown datatype 'FLOAT32'"),
        (_nested(("inputs", "0", "shape"), [4, 3]), "first dimension must be the batch"),
        (_nested(("outputs", "0", "shape"), [-1, 0]), "neither -1 nor positive"),
        (_invalid(inputs=[]), "inputs"),
        (_nested(("warmup", "batch_sizes"), [1, 16]), "batch sizes [16] are outside 1..max_batch_size=8"),
        (_nested(("batching", "preferred_batch_sizes"), [0, 4]), "batch sizes [0] are outside"),
        (_nested(("batching", "max_batch_size"), 0), "max_batch_size"),
        (_nested(("version",), 0), "version"),
        ({k: v for k, v in config().items() if k != "platform"}, "platform"),
        (_nested(("batching", "latency_budget_ms"), 0.5), "latency_budget_ms (0.5) must exceed"),
        (_nested(("batching", "latency_budget_ms"), -5), "latency_budget_ms"),
    ],
    ids=["unknown-key", "unknown-nested-key", "bad-datatype", "batch-dim-not-minus-1", "zero-dim", "no-inputs",
         "warmup-above-max-batch", "preferred-below-1", "max-batch-0", "version-0", "missing-platform",
         "budget-under-queue-delay", "negative-budget"],
)
def test_invalid_config_names_the_problem(tmp_path, cfg, problem):
    add_version(tmp_path, "toy", 1, cfg)
    with pytest.raises(ValueError) as err:
        ModelRepository(tmp_path).resolve("toy", 1)
    message = str(err.value)
    assert problem in message
    assert str(tmp_path / "toy" / "1" / "config.json") in message  # names the file


def test_config_that_is_not_json_is_refused(tmp_path):
    path = add_version(tmp_path, "toy", 1)
    (path / "config.json").write_text("{name: toy")
    with pytest.raises(ValueError, match="invalid model config"):
        ModelRepository(tmp_path).resolve("toy")


@pytest.mark.parametrize(("name", "version"), [("other", 1), ("toy", 2)])
def test_config_disagreeing_with_its_directory_is_refused(tmp_path, name, version):
    add_version(tmp_path, "toy", 1, config(name, version))
    with pytest.raises(ValueError, match=rf"says '{name}' v{version}, but lives at toy/1"):
        ModelRepository(tmp_path).resolve("toy")


def test_missing_artifact_is_refused(tmp_path):
    add_version(tmp_path, "toy", 1, config(artifact="weights.onnx"), artifact=False)
    with pytest.raises(ValueError, match=r"artifact 'weights\.onnx' is missing"):
        ModelRepository(tmp_path).resolve("toy")


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config("toy", 5)))
    assert load_config(path).version == 5
