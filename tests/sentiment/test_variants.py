"""Which runtime variant sentiment serves: TorchScript FP16 with a GPU, otherwise the fastest batch-invariant CPU
variant within 1 point of FP32 on the held-out set; the build's measurements behind that choice, on the real model."""

from __future__ import annotations

import asyncio
import copy
import json
import math

import numpy as np
import pytest
from prometheus_client import REGISTRY

from mlplatform.backends import select_runtime
from mlplatform.config import ModelConfig, load_config
from mlplatform.repository import ModelRepository
from mlplatform.runtimes.torchscript import DeviceChoice, select_device
from mlplatform.variants import choose_variant, qualifying, speed_score
from sentiment_service import build_model
from sentiment_service.model import SentimentModel


@pytest.fixture(scope="module")
def config(sentiment_version) -> ModelConfig:
    return load_config(sentiment_version / "config.json")


@pytest.fixture(scope="module")
def report(sentiment_version) -> dict:
    return json.loads((sentiment_version / build_model.VARIANTS_FILE).read_text())


def variants_and_rule(config: ModelConfig) -> tuple[dict, dict]:
    opts = config.runtime.options
    return copy.deepcopy(opts["variants"]), dict(opts["auto"])


def test_with_a_gpu_auto_serves_torchscript_fp16(config):
    choice, backend, options = select_runtime(config, gpu=True)
    assert (choice.name, choice.selection, backend) == ("torchscript_fp16", "auto", "torchscript")
    assert "GPU present" in choice.reason
    merged = {**config.runtime.options, **options}
    assert select_device(True, merged["device"], merged["precision"]) == DeviceChoice("cuda", "fp16")


def test_without_a_gpu_auto_serves_the_fastest_qualifying_cpu_variant(config):
    variants, rule = variants_and_rule(config)
    ref = variants[rule["reference"]]["measured"]["accuracy"]
    allowed = {n: v for n, v in variants.items() if v["target"] == "cpu" and v["measured"]["batch_invariant"]
               and v["measured"]["accuracy"] >= ref - 0.01 - 1e-9}
    rates = {n: math.prod(v["measured"]["rows_per_s"].values()) ** (1 / 3) for n, v in allowed.items()}
    choice, backend, _ = select_runtime(config, gpu=False)
    assert choice.name == max(rates, key=rates.get)
    assert choice.selection == "auto" and choice.reason.startswith("no GPU: ")
    assert backend == variants[choice.name]["backend"]


def test_a_candidate_more_than_one_point_below_the_fp32_model_is_never_chosen(config):
    variants, rule = variants_and_rule(config)
    ref = variants[rule["reference"]]["measured"]["accuracy"]
    fastest = {"1": 1e6, "8": 1e6, "32": 1e6}
    variants["onnx_int8_static"]["measured"].update(accuracy=ref - 0.0101, rows_per_s=fastest)
    assert choose_variant(variants, rule, gpu=False).name != "onnx_int8_static"
    assert "onnx_int8_static" not in qualifying(variants, rule)
    variants["onnx_int8_static"]["measured"]["accuracy"] = ref - 0.01  # exactly 1 point: allowed
    assert choose_variant(variants, rule, gpu=False).name == "onnx_int8_static"


def test_a_batch_dependent_candidate_is_chosen_only_when_the_rule_allows_it(config):
    variants, rule = variants_and_rule(config)
    ref = variants[rule["reference"]]["measured"]["accuracy"]
    variants["onnx_fused_int8"]["measured"].update(accuracy=ref, batch_invariant=False,
                                                   rows_per_s={"1": 1e6, "8": 1e6, "32": 1e6})
    assert rule["require_batch_invariant"] is True
    assert choose_variant(variants, rule, gpu=False).name != "onnx_fused_int8"
    assert choose_variant(variants, {**rule, "require_batch_invariant": False}, gpu=False).name == "onnx_fused_int8"


def test_an_unmeasured_variant_never_qualifies_and_a_bad_rule_is_named(config):
    variants, rule = variants_and_rule(config)
    variants["onnx_fused"]["measured"] = None
    assert "onnx_fused" not in qualifying(variants, rule)
    assert speed_score(None) == 0.0
    with pytest.raises(ValueError, match="reference 'nope' is not one of"):
        choose_variant(variants, {**rule, "reference": "nope"}, gpu=False)


def test_the_build_records_every_candidate_s_accuracy_and_speed(report, config):
    assert report["held_out_size"] >= 500
    candidates = report["candidates"]
    assert set(candidates) == {n for n, v in config.runtime.options["variants"].items() if v["target"] == "cpu"}
    ref = candidates[build_model.REFERENCE]["accuracy"]
    for name, row in candidates.items():
        assert set(row["rows_per_s"]) == {"1", "8", "32"} and all(r > 0 for r in row["rows_per_s"].values())
        assert row["within_1_point"] == (row["accuracy"] >= ref - 0.01 - 1e-9)
        assert row["qualifies"] == (row["within_1_point"] and row["batch_invariant"])
        if name in build_model.EXACT:
            assert row["accuracy"] == ref and row["batch_invariant"]
    served = report["served"]["cpu"]
    assert candidates[served]["qualifies"] and candidates[served]["accuracy"] >= ref - 0.01
    assert report["served"]["gpu"] == "torchscript_fp16"
    static = report["static_int8"]
    assert static["excluded"], "static INT8 keeps its sensitive MatMuls in FP32"
    assert all(static["matmul_activation_sqnr_db"][n] < static["sensitive_threshold_db"] for n in static["excluded"])
    assert report["fused_operators"]["Attention"] == 6


def test_the_served_variant_s_held_out_accuracy_is_what_the_build_recorded(model_repository, held_out, config):
    """Recomputed here with the service's model class: the recorded figure is real, and within 1 point of FP32."""
    model = SentimentModel(ModelRepository(model_repository).resolve("sentiment"))
    model._load()
    texts, labels = held_out
    predicted = []
    for i in range(0, len(texts), 32):
        batch = np.array([t.encode() for t in texts[i:i + 32]], dtype=object)
        predicted += model.infer({"text": batch})["label"].tolist()
    accuracy = float(np.mean([model.labels[p] == y for p, y in zip(predicted, labels, strict=True)]))
    measured = config.runtime.options["variants"][model.runtime_name]["measured"]
    assert accuracy == pytest.approx(measured["accuracy"], abs=1e-6)
    assert accuracy >= config.parameters["metrics"]["held_out_accuracy"] - 0.01


def test_the_loaded_model_reports_its_variant_in_config_and_metrics(model_repository, served_variant):
    model = SentimentModel(ModelRepository(model_repository).resolve("sentiment"))
    asyncio.run(model.load())
    variant = model.config.runtime.options["variants"][served_variant]
    assert model.runtime_name == served_variant
    assert model.config.artifact == variant["artifact"]
    assert model.config.platform == {"torchscript": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}[
        variant["backend"]]
    params = model.config.parameters
    assert params["runtime_variant"] == served_variant and params["runtime_variant_selection"] == "auto"
    assert params["runtime_variant_reason"] == model.variant_choice.reason
    assert REGISTRY.get_sample_value("inference_model_variant", {
        "model": "sentiment", "version": "1", "variant": served_variant, "backend": variant["backend"],
        "device": model.device, "selection": "auto"}) == 1
    pinned = SentimentModel(ModelRepository(model_repository).resolve("sentiment"), "onnx")
    assert (pinned.runtime_name, pinned.variant_choice.selection) == ("onnx", "override")
