"""mlplatform.runtimes.torchscript: device/precision selection, and a real TorchScript model on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlplatform.runtimes.torchscript import DeviceChoice, TorchScriptSession, select_device


@pytest.mark.parametrize(("cuda", "device", "precision", "expected"), [
    (True, "auto", "auto", DeviceChoice("cuda", "fp16")),
    (True, "auto", "fp32", DeviceChoice("cuda", "fp32")),
    (True, "cpu", "auto", DeviceChoice("cpu", "fp32")),
    (True, "cuda", "fp16", DeviceChoice("cuda", "fp16")),
    (False, "auto", "auto", DeviceChoice("cpu", "fp32")),
    (False, "auto", "fp32", DeviceChoice("cpu", "fp32")),
    (False, "cpu", "fp32", DeviceChoice("cpu", "fp32")),
])
def test_select_device_prefers_cuda_fp16_and_falls_back_to_cpu_fp32(cuda, device, precision, expected):
    choice = select_device(cuda, device, precision)
    assert choice == expected
    assert choice.kind == ("gpu" if expected.device == "cuda" else "cpu")


@pytest.mark.parametrize(("cuda", "device", "precision", "message"), [
    (False, "cuda", "auto", "no CUDA device"),
    (False, "auto", "fp16", "needs a CUDA device"),
    (True, "cpu", "fp16", "needs a CUDA device"),
    (True, "tpu", "auto", "runtime.options.device"),
    (True, "auto", "int4", "runtime.options.precision"),
])
def test_select_device_rejects_impossible_configs(cuda, device, precision, message):
    with pytest.raises(ValueError, match=message):
        select_device(cuda, device, precision)


class _Scorer(torch.nn.Module):
    """Masked mean of embedded ids through a linear layer: variable batch and sequence length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 4)
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.unsqueeze(-1).type_as(self.embed.weight)
        pooled = (self.embed(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.linear(pooled).softmax(-1), mask.sum(1)


def test_session_runs_a_traced_model_on_cpu_fp32_for_any_batch_and_length(tmp_path):
    net = _Scorer().eval()
    ids = torch.randint(0, 50, (2, 6))
    traced = torch.jit.trace(net, (ids, torch.ones_like(ids)))
    path = tmp_path / "scorer.pt"
    traced.save(str(path))

    session = TorchScriptSession(path, input_names=["ids", "mask"], output_names=["probs", "count"],
                                 intra_op_threads=1, options={"device": "cpu"})
    assert (session.device, session.precision) == ("cpu", "fp32")
    rng = np.random.default_rng(1)
    for batch, length in [(1, 3), (5, 17)]:
        x = rng.integers(0, 50, size=(batch, length), dtype=np.int64)
        mask = np.ones((batch, length), dtype=np.int64)
        mask[0, length // 2:] = 0
        out = session.run({"ids": x, "mask": mask})
        with torch.no_grad():
            want, count = net(torch.from_numpy(x), torch.from_numpy(mask))
        assert out["probs"].dtype == np.float32 and out["probs"].shape == (batch, 2)
        np.testing.assert_allclose(out["probs"], want.numpy(), atol=1e-6)
        assert out["count"].tolist() == count.tolist()
