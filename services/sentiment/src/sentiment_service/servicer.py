"""sentiment.v1.SentimentService: typed requests <-> a BYTES text tensor; everything else is the shared Predictor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from sentiment.v1 import sentiment_pb2 as pb
from sentiment.v1 import sentiment_pb2_grpc as pb_grpc

from mlplatform.errors import InvalidInputError, ServingError, abort_on_serving_error
from mlplatform.interceptors import set_request_model
from mlplatform.pipeline import Predictor
from mlplatform.typed import batch_results, check_batch_size, check_version, split_valid, stream_results
from sentiment_service.model import INPUT, PROBABILITIES, TOKENS, TRUNCATED, SentimentModel

SERVICE_NAME = "sentiment.v1.SentimentService"


class SentimentServicer(pb_grpc.SentimentServiceServicer):
    """Validates texts, classifies them through the Predictor, maps the outputs to predictions."""

    def __init__(self, predictor: Predictor, *, max_stream_in_flight: int = 64) -> None:
        self.predictor = predictor
        self.model: SentimentModel = predictor.model  # type: ignore[assignment]
        self.max_stream_in_flight = max_stream_in_flight

    def _text(self, text: str, field: str) -> bytes:
        problem = self.model.text_problem(text)
        if problem:
            raise InvalidInputError(f"{field}: {problem}")
        return text.encode("utf-8")

    async def _classify(self, texts: Sequence[bytes], context: grpc.aio.ServicerContext
                        ) -> list[pb.SentimentPrediction]:
        tensor = np.empty(len(texts), dtype=object)
        tensor[:] = list(texts)
        prediction = await self.predictor.predict({INPUT: tensor}, timeout_s=context.time_remaining())
        out = prediction.outputs
        labels = self.model.labels
        results = []
        for i in range(len(texts)):
            probs = out[PROBABILITIES][i]
            best = int(np.argmax(probs))
            results.append(pb.SentimentPrediction(
                label=labels[best], score=float(probs[best]),
                probabilities=[pb.ClassProbability(label=label, probability=float(p))
                               for label, p in zip(labels, probs, strict=True)],
                truncated=bool(out[TRUNCATED][i]), tokens=int(out[TOKENS][i]),
                model_name=self.model.name, model_version=self.model.version,
            ))
        return results

    async def _predict_one(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                           ) -> pb.SentimentPrediction:
        check_version(self.model, request.model_version)
        [prediction] = await self._classify([self._text(request.text, "text")], context)
        return prediction

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
        n = len(request.texts)
        check_batch_size(n, self.model.max_batch_size, "texts")
        parsed = split_valid(request.texts, lambda i, text: self._text(text, f"texts[{i}]"))

        async def classify(indices: list[int], texts: list[str]) -> list[pb.SentimentPrediction]:
            return await self._classify(texts, context)

        results = await batch_results(parsed, n, classify, lambda p: pb.SentimentResult(prediction=p), _error_result)
        return pb.PredictBatchResponse(results=results, model_name=self.model.name,
                                       model_version=self.model.version)

    async def StreamPredict(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SentimentResult]:
        set_request_model(self.model.name, self.model.version)

        async def handle(request: pb.PredictRequest) -> pb.SentimentResult:
            return pb.SentimentResult(prediction=await self._predict_one(request, context))

        async for result in stream_results(requests, handle, _error_result,
                                           max_in_flight=self.max_stream_in_flight):
            yield result


def _error_result(index: int, err: ServingError) -> pb.SentimentResult:
    return pb.SentimentResult(error=pb.ItemError(index=index, code=err.code.name, message=err.message))
