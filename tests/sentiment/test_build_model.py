"""The sentiment build: data split, recorded metrics, artifacts that match the eager model on any shape, runtimes."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from mlplatform.repository import ModelRepository
from mlplatform.runtimes.torchscript import TorchScriptSession
from sentiment_service import build_model
from sentiment_service.model import SentimentModel
from sentiment_service.network import load_network
from sentiment_service.text import TextEncoder

CPU_VARIANTS = ["torchscript", "onnx", "onnx_fused", "onnx_int8", "onnx_int8_pc", "onnx_fused_int8", "onnx_int8_static"]


def test_data_set_is_balanced_with_a_held_out_split_never_trained_on():
    examples = build_model.load_examples()
    train = [e for e in examples if e.split == "train"]
    test = [e for e in examples if e.split == "test"]
    assert len(test) >= 500 and len(train) >= 500
    for part in (train, test):
        assert abs(sum(e.label for e in part) - len(part) / 2) <= 1
    assert not {e.text for e in train} & {e.text for e in test}


def test_version_records_accuracy_runtimes_and_tokenizer(model_repository):
    version = ModelRepository(model_repository).resolve("sentiment")
    cfg = version.config
    assert cfg.platform == "pytorch_libtorch" and cfg.artifact == build_model.TORCHSCRIPT
    metrics = cfg.parameters["metrics"]
    assert metrics["held_out_accuracy"] >= 0.85
    assert set(metrics["runtimes"]) == set(CPU_VARIANTS)
    for name in build_model.EXACT:
        assert metrics["runtimes"][name]["max_abs_diff_vs_eager"] <= build_model.PARITY_TOLERANCE
        assert metrics["runtimes"][name]["accuracy"] == metrics["held_out_accuracy"]
    for name in set(CPU_VARIANTS) - set(build_model.EXACT):
        assert metrics["runtimes"][name]["accuracy"] >= 0.85
    assert cfg.parameters["max_sequence_length"] == 128
    for variant in cfg.runtime.options["variants"].values():
        assert (version.path / variant["artifact"]).is_file()
    assert json.loads((version.path / "tokenizer.json").read_text())["padding"]["strategy"] == {"Fixed": 128}


def test_torchscript_artifact_matches_eager_on_new_batch_and_sequence_shapes(sentiment_version):
    net = load_network(sentiment_version)
    session = TorchScriptSession(sentiment_version / build_model.TORCHSCRIPT, intra_op_threads=2,
                                 input_names=["input_ids", "attention_mask"], output_names=["probabilities"])
    encoder = TextEncoder(sentiment_version / "tokenizer.json", 128)
    for texts in (["Short."], ["A slightly longer sentence about a very good meal.", "Bad.", "word " * 200]):
        batch = encoder.encode(texts)
        served = session.run({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        with torch.inference_mode():
            want = net(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)).numpy()
        np.testing.assert_allclose(served["probabilities"], want, atol=1e-5)


def test_padding_does_not_change_a_text_s_answer(sentiment_version):
    """Pad-to-longest batching is sound: a short text alone and next to a long one gets the same answer."""
    net = load_network(sentiment_version)
    encoder = TextEncoder(sentiment_version / "tokenizer.json", 128)
    alone, mixed = encoder.encode(["Pretty good."]), encoder.encode(["Pretty good.", "meh " * 100])
    with torch.inference_mode():
        a = net(torch.from_numpy(alone.input_ids), torch.from_numpy(alone.attention_mask)).numpy()[0]
        b = net(torch.from_numpy(mixed.input_ids), torch.from_numpy(mixed.attention_mask)).numpy()[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("runtime", CPU_VARIANTS)
def test_config_selects_the_runtime_and_each_answers_like_the_eager_model(model_repository, eager, runtime):
    version = ModelRepository(model_repository).resolve("sentiment")
    model = SentimentModel(version, runtime)
    asyncio.run(model.load())
    texts = ["What a wonderful surprise.", "I regret ordering this.", "Not worth it."]
    arr = np.array([t.encode() for t in texts], dtype=object)
    out = model.infer({"text": arr})
    want = eager(texts)
    if runtime not in build_model.EXACT:  # INT8 is approximate: clear cases keep their label, probabilities move
        confident = np.abs(want[:, 1] - 0.5) > 0.3
        assert confident.sum() >= 2
        assert (out["probabilities"][confident].argmax(1) == want[confident].argmax(1)).all()
        assert np.abs(out["probabilities"] - want).mean() < 0.1
    else:
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-4)
    assert model.device == "cpu"
    assert model.providers == (["torchscript:cpu:fp32"] if runtime == "torchscript" else ["CPUExecutionProvider"])


def test_rebuild_is_skipped_when_the_version_exists(model_repository, capsys):
    path = build_model.build(model_repository, version=1)
    assert path == model_repository / "sentiment" / "1"
    assert "exists" in capsys.readouterr().out
