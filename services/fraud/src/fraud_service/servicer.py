"""fraud.v1.FraudService: typed requests <-> feature tensors; everything else is the shared Predictor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as pb_grpc

from fraud_service.model import INPUT, PROBABILITIES, FraudModel
from mlplatform.errors import InvalidInputError, ServingError, abort_on_serving_error
from mlplatform.interceptors import set_request_model
from mlplatform.pipeline import Prediction, Predictor
from mlplatform.typed import batch_results, check_batch_size, check_version, split_valid, stream_results

SERVICE_NAME = "fraud.v1.FraudService"


class FraudServicer(pb_grpc.FraudServiceServicer):
    """Validates transactions, scores them through the Predictor, and reports where answers came from."""

    def __init__(self, predictor: Predictor, *, max_stream_in_flight: int = 64) -> None:
        self.predictor = predictor
        self.model: FraudModel = predictor.model  # type: ignore[assignment]
        self.max_stream_in_flight = max_stream_in_flight

    # -- request -> tensor ------------------------------------------------------------

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
        check_version(self.model, request.model_version)
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
        check_version(self.model, request.model_version)
        n = len(request.transactions)
        check_batch_size(n, self.model.max_batch_size, "transactions")
        parsed = split_valid(request.transactions, lambda i, tx: self._row(tx, f"transactions[{i}]"))

        async def score(indices: list[int], rows: list[np.ndarray]) -> list[pb.FraudPrediction]:
            return await self._score(np.stack(rows), [request.transactions[i].transaction_id for i in indices],
                                     context)

        results = await batch_results(parsed, n, score, lambda p: pb.FraudResult(prediction=p), _error_result)
        return pb.PredictBatchResponse(results=results, model_name=self.model.name, model_version=self.model.version)

    async def StreamPredict(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FraudResult]:
        set_request_model(self.model.name, self.model.version)

        async def handle(request: pb.PredictRequest) -> pb.FraudResult:
            return pb.FraudResult(prediction=await self._predict_one(request, context))

        async for result in stream_results(requests, handle, _error_result,
                                           max_in_flight=self.max_stream_in_flight):
            yield result


def _error_result(index: int, err: ServingError) -> pb.FraudResult:
    return pb.FraudResult(error=pb.ItemError(index=index, code=err.code.name, message=err.message))
