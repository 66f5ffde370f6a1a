"""fraud.v1.FraudService: typed requests <-> feature tensors; everything else is the shared Predictor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as pb_grpc

from fraud_service.model import INPUT, PROBABILITIES, FraudModel
from mlplatform.errors import InvalidInputError, NotFoundError, ServingError, abort_on_serving_error
from mlplatform.interceptors import set_request_model
from mlplatform.pipeline import Prediction, Predictor
from mlplatform.streaming import ordered_concurrent

SERVICE_NAME = "fraud.v1.FraudService"


class FraudServicer(pb_grpc.FraudServiceServicer):
    """Validates transactions, scores them through the Predictor, and reports where answers came from."""

    def __init__(self, predictor: Predictor, *, max_stream_in_flight: int = 64) -> None:
        self.predictor = predictor
        self.model: FraudModel = predictor.model  # type: ignore[assignment]
        self.max_stream_in_flight = max_stream_in_flight

    # -- request -> tensor ------------------------------------------------------------

    def _check_version(self, requested: str) -> None:
        if requested not in ("", "0", self.model.version):
            raise NotFoundError(f"model_version: {self.model.name} has no version {requested!r} served; "
                                f"served version: {self.model.version}")

    def _row(self, tx: pb.Transaction, field: str) -> np.ndarray:
        """One transaction as a float32 row, or InvalidInputError naming the field."""
        row = np.asarray(tx.features, dtype=np.float32)
        problem = self.model.row_problem(row)
        if problem:
            raise InvalidInputError(f"{field}.{problem}")
        return row

    def _prediction(self, tx_id: str, p: float, cached: bool, fallback: bool) -> pb.FraudPrediction:
        return pb.FraudPrediction(
            transaction_id=tx_id, fraud_probability=p, is_fraud=p >= self.model.threshold,
            threshold=self.model.threshold, model_name=self.model.name, model_version=self.model.version,
            cached=cached, fallback=fallback,
        )

    async def _score(self, rows: np.ndarray, ids: Sequence[str], context: grpc.aio.ServicerContext
                     ) -> list[pb.FraudPrediction]:
        prediction: Prediction = await self.predictor.predict({INPUT: rows}, timeout_s=context.time_remaining())
        p1 = prediction.outputs[PROBABILITIES][:, 1]
        return [self._prediction(ids[i], float(p1[i]), bool(prediction.cached[i]), bool(prediction.fallback[i]))
                for i in range(len(ids))]

    async def _predict_one(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                           ) -> pb.FraudPrediction:
        self._check_version(request.model_version)
        row = self._row(request.transaction, "transaction")
        [prediction] = await self._score(row[np.newaxis], [request.transaction.transaction_id], context)
        return prediction

    # -- RPCs -------------------------------------------------------------------------

    @abort_on_serving_error
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        set_request_model(self.model.name, self.model.version)
        return pb.PredictResponse(prediction=await self._predict_one(request, context))

    @abort_on_serving_error
    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictBatchResponse:
        set_request_model(self.model.name, self.model.version)
        self._check_version(request.model_version)
        n = len(request.transactions)
        if n == 0:
            raise InvalidInputError("transactions: empty batch, at least one transaction is required")
        if n > self.model.max_batch_size:
            raise InvalidInputError(f"transactions: {n} items, at most {self.model.max_batch_size} per batch")
        results: list[pb.FraudResult | None] = [None] * n
        good: list[int] = []
        rows: list[np.ndarray] = []
        for i, tx in enumerate(request.transactions):
            try:
                rows.append(self._row(tx, f"transactions[{i}]"))
                good.append(i)
            except InvalidInputError as err:
                results[i] = _error_result(i, err)
        if good:
            ids = [request.transactions[i].transaction_id for i in good]
            for i, prediction in zip(good, await self._score(np.stack(rows), ids, context), strict=True):
                results[i] = pb.FraudResult(prediction=prediction)
        return pb.PredictBatchResponse(results=results, model_name=self.model.name, model_version=self.model.version)

    async def StreamPredict(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FraudResult]:
        set_request_model(self.model.name, self.model.version)

        async def handle(index: int, request: pb.PredictRequest) -> pb.FraudResult:
            try:
                return pb.FraudResult(prediction=await self._predict_one(request, context))
            except ServingError as err:
                return _error_result(index, err)

        async for result in ordered_concurrent(requests, handle, max_in_flight=self.max_stream_in_flight):
            yield result


def _error_result(index: int, err: ServingError) -> pb.FraudResult:
    return pb.FraudResult(error=pb.ItemError(index=index, code=err.code.name, message=err.message))
