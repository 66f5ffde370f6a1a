"""fraud.v1.FraudService: a transaction <-> one feature row; everything else is the shared data plane.

A transaction comes with its 30 features, or with `card_id` and its own fields: then `online.prepare` reads
the card's aggregates from the online feature store and assembles the row (fraud_service.online)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as pb_grpc

from fraud_service import online
from fraud_service.model import INPUT, PROBABILITIES, FraudModel
from fraud_service.settings import FraudSettings
from mlplatform.dataplane import RowAnswer
from mlplatform.model import Tensors
from mlplatform.server import ServiceSpec
from mlplatform.typed import TypedApi


def parse(model: FraudModel, item: pb.Transaction | online.CardTransaction, field: str) -> Tensors:
    """One transaction's features as a float32 row (the data plane checks width, finiteness and ranges)."""
    if isinstance(item, online.CardTransaction):
        return {INPUT: item.row}
    features = item.features
    return {INPUT: np.fromiter(features, np.float32, len(features))}


def cache_key(model: FraudModel, item: pb.Transaction | online.CardTransaction) -> str | None:
    """A card transaction is a repeat when the same card sends the same transaction fields within the cache's
    TTL (`online.repeat_key`); a raw-feature transaction is keyed on its features."""
    return online.repeat_key(item.tx) if isinstance(item, online.CardTransaction) else None


def wrap(model: FraudModel, item: pb.Transaction | online.CardTransaction, answer: RowAnswer,
         options: Any) -> pb.FraudPrediction:
    """The fraud probability, the decision at this version's threshold, and where the answer came from; the
    prediction is then written behind to the audit log (and the card's aggregates updated)."""
    card = isinstance(item, online.CardTransaction)
    tx = item.tx if card else item
    p = float(answer.outputs[PROBABILITIES][1])
    prediction = pb.FraudPrediction(
        transaction_id=tx.transaction_id, fraud_probability=p, is_fraud=p >= model.threshold,
        threshold=model.threshold, model_name=model.name, model_version=model.version,
        cached=answer.cached, fallback=answer.fallback,
        feature_source=item.source if card else "request", card_id=tx.card_id,
    )
    online.record_prediction(tx, item, prediction)
    return prediction


API = TypedApi(pb=pb, pb_grpc=pb_grpc, service="FraudService", answer_field="prediction", result="FraudResult",
               batch_field="transactions", item_field="transaction", parse=parse, wrap=wrap,
               prepare=online.prepare, cache_key=cache_key)

SPEC = ServiceSpec(name="fraud", default_model="fraud", model_factory=FraudModel, settings_cls=FraudSettings,
                   typed_api=API, lifespan=online.lifespan)
