"""mlplatform.runtimes.onnx: TensorRT options resolved for a model version (cache paths, optimisation profile)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlplatform.runtimes.onnx import CPU, CUDA, TENSORRT, resolve_provider_options, tensorrt_profile_shapes


def test_profile_shapes_for_every_input():
    shapes = tensorrt_profile_shapes([("image", [-1, 1, 28, 28]), ("mask", [-1, 4])],
                                     min_batch=1, opt_batch=8, max_batch=32)
    assert shapes == {
        "trt_profile_min_shapes": "image:1x1x28x28,mask:1x4",
        "trt_profile_opt_shapes": "image:8x1x28x28,mask:8x4",
        "trt_profile_max_shapes": "image:32x1x28x28,mask:32x4",
    }


@pytest.mark.parametrize(("batches", "inputs", "match"), [
    ((1, 64, 32), [("x", [-1, 3])], "min <= opt <= max"),
    ((0, 1, 1), [("x", [-1, 3])], "min <= opt <= max"),
    ((1, 8, 32), [("tokens", [-1, -1])], "only dynamic dimension"),
    ((1, 8, 32), [("x", [3, 3])], "only dynamic dimension"),
])
def test_profile_shapes_refuse_what_they_cannot_derive(batches, inputs, match):
    lo, opt, hi = batches
    with pytest.raises(ValueError, match=match):
        tensorrt_profile_shapes(inputs, min_batch=lo, opt_batch=opt, max_batch=hi)


def test_relative_cache_paths_go_under_the_version_directory(tmp_path: Path):
    options = {TENSORRT: {"trt_engine_cache_enable": True, "trt_engine_cache_path": "trt",
                          "trt_timing_cache_path": "/var/cache/trt"},
               CUDA: {"cudnn_conv_algo_search": "HEURISTIC"}}
    out = resolve_provider_options(options, model_dir=tmp_path, inputs=[("x", [-1, 3])], max_batch_size=16)
    assert out[TENSORRT]["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert out[TENSORRT]["trt_timing_cache_path"] == "/var/cache/trt"  # absolute: kept
    assert out[TENSORRT]["trt_profile_opt_shapes"] == "x:16x3"  # opt defaults to the max batch
    assert out[CUDA] == {"cudnn_conv_algo_search": "HEURISTIC"}
    assert options[TENSORRT]["trt_engine_cache_path"] == "trt"  # the config is not modified


def test_explicit_profile_is_kept_and_other_providers_untouched(tmp_path: Path):
    explicit = {"trt_profile_min_shapes": "x:1x3", "trt_profile_opt_shapes": "x:4x3",
                "trt_profile_max_shapes": "x:8x3"}
    out = resolve_provider_options({TENSORRT: explicit}, model_dir=tmp_path, inputs=[("x", [-1, 3])],
                                   max_batch_size=16, opt_batch_size=8)
    assert out == {TENSORRT: explicit}
    assert resolve_provider_options(None, model_dir=tmp_path) == {}
    assert resolve_provider_options({CPU: {"a": 1}}, model_dir=tmp_path) == {CPU: {"a": 1}}
