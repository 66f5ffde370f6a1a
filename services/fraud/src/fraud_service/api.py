"""fraud.v1.FraudService: a transaction <-> one feature row; everything else is the shared data plane."""

from __future__ import annotations

from typing import Any

import numpy as np
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as pb_grpc

from fraud_service.model import INPUT, PROBABILITIES, FraudModel
from fraud_service.settings import FraudSettings
from mlplatform.dataplane import RowAnswer
from mlplatform.model import Tensors
from mlplatform.server import ServiceSpec
from mlplatform.typed import TypedApi


def parse(model: FraudModel, tx: pb.Transaction, field: str) -> Tensors:
    """One transaction's features as a float32 row (the data plane checks width, finiteness and ranges)."""
    features = tx.features
    return {INPUT: np.fromiter(features, np.float32, len(features))}


def wrap(model: FraudModel, tx: pb.Transaction, answer: RowAnswer, options: Any) -> pb.FraudPrediction:
    """The fraud probability, the decision at this version's threshold, and where the answer came from."""
    p = float(answer.outputs[PROBABILITIES][1])
    return pb.FraudPrediction(
        transaction_id=tx.transaction_id, fraud_probability=p, is_fraud=p >= model.threshold,
        threshold=model.threshold, model_name=model.name, model_version=model.version,
        cached=answer.cached, fallback=answer.fallback,
    )


API = TypedApi(pb=pb, pb_grpc=pb_grpc, service="FraudService", answer_field="prediction", result="FraudResult",
               batch_field="transactions", item_field="transaction", parse=parse, wrap=wrap)

SPEC = ServiceSpec(name="fraud", default_model="fraud", model_factory=FraudModel, settings_cls=FraudSettings,
                   typed_api=API)
