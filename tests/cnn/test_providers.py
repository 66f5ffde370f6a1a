"""Execution providers for the cnn model's config: TensorRT FP16 with its profile and cache, then CUDA, then CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn_service.model import CnnModel
from mlplatform.repository import ModelRepository
from mlplatform.runtimes.onnx import CPU, CUDA, TENSORRT, select_providers


@pytest.fixture(scope="module")
def model(model_repository: Path) -> CnnModel:
    return CnnModel(ModelRepository(model_repository).resolve("cnn", 1))


def _expected_tensorrt(version_dir: Path) -> dict:
    return {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(version_dir / "trt_cache"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(version_dir / "trt_cache"),
        "trt_max_workspace_size": 1 << 30,
        "trt_profile_min_shapes": "image:1x1x32x32",
        "trt_profile_opt_shapes": "image:16x1x32x32",
        "trt_profile_max_shapes": "image:32x1x32x32",
    }


CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def test_tensorrt_cuda_cpu(model):
    chosen = select_providers([TENSORRT, CUDA, CPU], model.config.runtime.providers, model.provider_options())
    assert chosen == [(TENSORRT, _expected_tensorrt(model.model_version.path)), (CUDA, CUDA_OPTIONS), (CPU, {})]


def test_cuda_cpu(model):
    chosen = select_providers([CUDA, CPU], model.config.runtime.providers, model.provider_options())
    assert chosen == [(CUDA, CUDA_OPTIONS), (CPU, {})]


def test_cpu_only(model):
    assert select_providers([CPU], model.config.runtime.providers, model.provider_options()) == [(CPU, {})]


def test_the_profile_covers_every_batch_the_batcher_makes(model):
    trt = model.provider_options()[TENSORRT]
    max_batch = int(trt["trt_profile_max_shapes"].split(":")[1].split("x")[0])
    opt_batch = int(trt["trt_profile_opt_shapes"].split(":")[1].split("x")[0])
    assert max_batch == model.max_batch_size == 32
    assert opt_batch in model.config.batching.preferred_batch_sizes
    assert all(b <= max_batch for b in model.config.warmup.batch_sizes)
