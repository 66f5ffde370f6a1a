"""Sentiment fixtures: the eager PyTorch model of the built version, the variant a service serves on this machine
(run in-process: the reference for the service's answers), held-out texts, stubs.

The gateway fixtures are the gateway tests' own (one Envoy in front of every service).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from sentiment.v1 import sentiment_pb2_grpc as rpc

from tests.gateway.conftest import gateway, gateway_channel, signing_key, token  # noqa: F401  (fixtures)
from tests.support.procs import ServiceProcess

# Served answers vs the same runtime variant run in-process on each text alone: the served variant is
# batch-invariant (the build's rule), so only batch composition and padding differ.
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def sentiment_version(model_repository: Path) -> Path:
    return model_repository / "sentiment" / "1"


@pytest.fixture(scope="session")
def sentiment_config(sentiment_version: Path) -> dict:
    return json.loads((sentiment_version / "config.json").read_text())


@pytest.fixture(scope="session")
def eager(sentiment_version: Path) -> Callable[[Sequence[str]], np.ndarray]:
    """The eager PyTorch network rebuilt from the version's state dict: texts -> probabilities [N, 2].

    Each text is encoded on its own (no padding), so the reference does not depend on batching.
    """
    import torch

    from sentiment_service.network import load_network
    from sentiment_service.text import TextEncoder

    params = json.loads((sentiment_version / "config.json").read_text())["parameters"]
    net = load_network(sentiment_version)
    encoder = TextEncoder(sentiment_version / "tokenizer.json", params["max_sequence_length"])

    def run(texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for text in texts:
                enc = encoder.encode([text])
                out.append(net(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)).numpy()[0])
        return np.stack(out)

    return run


@pytest.fixture(scope="session")
def served_variant(sentiment_version: Path) -> str:
    """The runtime variant a sentiment service on this machine serves (`auto`: hardware and build measurements)."""
    from mlplatform.backends import runtime_variant
    from mlplatform.config import load_config

    return runtime_variant(load_config(sentiment_version / "config.json"))[0]


@pytest.fixture(scope="session")
def served(model_repository: Path) -> Callable[[Sequence[str]], np.ndarray]:
    """The served variant run in-process by the service's model class, each text alone: texts -> probabilities."""
    from mlplatform.repository import ModelRepository
    from sentiment_service.model import SentimentModel

    model = SentimentModel(ModelRepository(model_repository).resolve("sentiment"))
    model._load()

    def run(texts: Sequence[str]) -> np.ndarray:
        return np.stack([model.infer({"text": np.array([t.encode()], dtype=object)})["probabilities"][0]
                         for t in texts])

    return run


@pytest.fixture(scope="session")
def held_out() -> tuple[list[str], list[str]]:
    """Held-out texts and labels of the project's data set (never trained on)."""
    from sentiment_service.build_model import DATA_FILE

    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    return [r["text"] for r in test], [r["label"] for r in test]


@pytest.fixture(scope="session")
def sentiment_stub(sentiment_service: ServiceProcess) -> Iterator[rpc.SentimentServiceStub]:
    with grpc.insecure_channel(sentiment_service.target) as channel:
        yield rpc.SentimentServiceStub(channel)


def long_text(words: int = 200) -> str:
    """A review longer than 128 tokens."""
    base = ("The hotel room was clean and the staff were friendly, but the breakfast was cold and the "
            "wifi kept dropping every few minutes during my stay. ")
    out = []
    while len(" ".join(out).split()) < words:
        out.append(base)
    return " ".join(out)
