"""Typed-API helpers for fraud tests."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import numpy as np
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as pb_grpc


def stub(target: str) -> tuple[grpc.Channel, pb_grpc.FraudServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.FraudServiceStub(channel)


def tx(row: Iterable[float], tx_id: str = "") -> pb.Transaction:
    return pb.Transaction(transaction_id=tx_id, features=[float(v) for v in row])


def predict_request(row: Iterable[float], tx_id: str = "", version: str = "") -> pb.PredictRequest:
    return pb.PredictRequest(transaction=tx(row, tx_id), model_version=version)


def perturb(rows: np.ndarray, seed: int) -> np.ndarray:
    """Rows nobody has sent before (so the cache cannot have them): nudge the PCA columns."""
    rng = np.random.default_rng(seed)
    out = rows.copy()
    out[:, -12:] += rng.uniform(-0.01, 0.01, size=(rows.shape[0], 12)).astype(np.float32)
    return out
