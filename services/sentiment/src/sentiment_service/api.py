"""sentiment.v1.SentimentService: a text <-> one BYTES element; everything else is the shared data plane."""

from __future__ import annotations

from typing import Any

import numpy as np
from sentiment.v1 import sentiment_pb2 as pb
from sentiment.v1 import sentiment_pb2_grpc as pb_grpc

from mlplatform.dataplane import RowAnswer
from mlplatform.model import Tensors
from mlplatform.repository import ModelVersion
from mlplatform.server import ServiceSpec
from mlplatform.typed import TypedApi
from sentiment_service.model import INPUT, PROBABILITIES, TOKENS, TRUNCATED, SentimentModel
from sentiment_service.settings import SentimentSettings


def parse(model: SentimentModel, text: str, field: str) -> Tensors:
    """The text as one UTF-8 BYTES element (the data plane checks emptiness and length)."""
    return {INPUT: np.array(text.encode("utf-8"), dtype=object)}


def wrap(model: SentimentModel, text: str, answer: RowAnswer, options: Any) -> pb.SentimentPrediction:
    """The most probable label, every class's probability, and how the text was tokenised."""
    out = answer.outputs
    probs = out[PROBABILITIES]
    best = int(np.argmax(probs))
    return pb.SentimentPrediction(
        label=model.labels[best], score=float(probs[best]),
        probabilities=[pb.ClassProbability(label=label, probability=float(p))
                       for label, p in zip(model.labels, probs, strict=True)],
        truncated=bool(out[TRUNCATED]), tokens=int(out[TOKENS]),
        model_name=model.name, model_version=model.version,
    )


def load(version: ModelVersion) -> SentimentModel:
    """The model with the runtime variant `SENTIMENT_RUNTIME` names (default: the config's)."""
    return SentimentModel(version, SentimentSettings().runtime or None)


API = TypedApi(pb=pb, pb_grpc=pb_grpc, service="SentimentService", answer_field="prediction",
               result="SentimentResult", batch_field="texts", item_field="text", parse=parse, wrap=wrap,
               problem_format="{field}: {problem}")

SPEC = ServiceSpec(name="sentiment", default_model="sentiment", model_factory=load, settings_cls=SentimentSettings,
                   typed_api=API)
