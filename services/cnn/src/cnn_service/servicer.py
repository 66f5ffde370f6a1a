"""cnn.v1.CnnService: images or pixel tensors -> model input; probabilities -> top-k classes.

Everything else (cache, batching, breaker, metrics) is the shared Predictor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from cnn.v1 import cnn_pb2 as pb
from cnn.v1 import cnn_pb2_grpc as pb_grpc

from cnn_service.images import decode_image, pixels_from_tensor
from cnn_service.model import INPUT, PROBABILITIES, CnnModel
from mlplatform.errors import InvalidInputError, ServingError, abort_on_serving_error
from mlplatform.interceptors import set_request_model
from mlplatform.pipeline import Predictor
from mlplatform.typed import Split, batch_results, check_batch_size, check_version, split_valid, stream_results

SERVICE_NAME = "cnn.v1.CnnService"
# Encoded images larger than this (in total, per request) are decoded on a worker thread, off the event loop.
DECODE_INLINE_BYTES = 64 * 1024

Input = pb.PredictRequest | pb.ImageInput


class CnnServicer(pb_grpc.CnnServiceServicer):
    """Decodes and checks images, classifies them through the Predictor, answers with the top-k classes."""

    def __init__(self, predictor: Predictor, *, max_stream_in_flight: int = 64) -> None:
        self.predictor = predictor
        self.model: CnnModel = predictor.model  # type: ignore[assignment]
        self.max_stream_in_flight = max_stream_in_flight

    # -- request -> pixels ------------------------------------------------------------

    def _pixels(self, item: Input, field: str) -> np.ndarray:
        """One image or tensor as float32 pixels [H, W], or InvalidInputError naming the field."""
        prefix = f"{field}." if field else ""
        which = item.WhichOneof("input")
        if which == "image":
            return decode_image(item.image, self.model.limits, f"{prefix}image")
        if which == "tensor":
            t = item.tensor
            return pixels_from_tensor(t.shape, t.datatype, t.fp32_contents, t.raw_contents, self.model.limits,
                                      f"{prefix}tensor")
        raise InvalidInputError(f"{prefix}input: set image (PNG, JPEG or BMP bytes) or tensor (pixels)")

    async def _parse(self, items: Sequence[Input], fields: Sequence[str]) -> Split[np.ndarray]:
        """Pixels per item, with per-item errors; large images are decoded on a worker thread."""

        def parse() -> Split[np.ndarray]:
            return split_valid(items, lambda i, item: self._pixels(item, fields[i]))

        encoded = sum(len(item.image) for item in items if item.WhichOneof("input") == "image")
        return await asyncio.to_thread(parse) if encoded > DECODE_INLINE_BYTES else parse()

    def _top_k(self, requested: int) -> int:
        n = self.model.num_classes
        if requested == 0:
            return self.model.default_top_k
        if not 1 <= requested <= n:
            raise InvalidInputError(f"top_k: {requested} is out of range 1..{n} "
                                    f"(0 means the model's default, {self.model.default_top_k})")
        return requested

    # -- probabilities -> response ----------------------------------------------------

    def _classification(self, item_id: str, probs: np.ndarray, k: int, cached: bool) -> pb.Classification:
        order = np.argsort(-probs, kind="stable")[:k]
        classes = [pb.ClassScore(label=self.model.labels[c], class_index=int(c), probability=float(probs[c]))
                   for c in order]
        return pb.Classification(id=item_id, classes=classes, model_name=self.model.name,
                                 model_version=self.model.version, cached=cached)

    async def _classify(self, pixels: list[np.ndarray], ids: Sequence[str], k: int,
                        context: grpc.aio.ServicerContext) -> list[pb.Classification]:
        batch = np.stack(pixels)[:, np.newaxis].astype(np.float32, copy=False)
        prediction = await self.predictor.predict({INPUT: batch}, timeout_s=context.time_remaining())
        probs = prediction.outputs[PROBABILITIES]
        return [self._classification(ids[i], probs[i], k, bool(prediction.cached[i])) for i in range(len(ids))]

    async def _predict_one(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
                           ) -> pb.Classification:
        check_version(self.model, request.model_version)
        k = self._top_k(request.top_k)
        parsed = await self._parse([request], [""])
        if parsed.errors:
            raise parsed.errors[0]
        [classification] = await self._classify(parsed.values, [request.id], k, context)
        return classification

    # -- RPCs -------------------------------------------------------------------------

    @abort_on_serving_error
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        set_request_model(self.model.name, self.model.version)
        return pb.PredictResponse(classification=await self._predict_one(request, context))

    @abort_on_serving_error
    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictBatchResponse:
        set_request_model(self.model.name, self.model.version)
        check_version(self.model, request.model_version)
        k = self._top_k(request.top_k)
        n = len(request.inputs)
        check_batch_size(n, self.model.max_batch_size, "inputs")
        parsed = await self._parse(request.inputs, [f"inputs[{i}]" for i in range(n)])

        async def classify(indices: list[int], pixels: list[np.ndarray]) -> list[pb.Classification]:
            return await self._classify(pixels, [request.inputs[i].id for i in indices], k, context)

        results = await batch_results(parsed, n, classify, lambda c: pb.ClassificationResult(classification=c),
                                      _error_result)
        return pb.PredictBatchResponse(results=results, model_name=self.model.name, model_version=self.model.version)

    async def StreamPredict(
        self, requests: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassificationResult]:
        set_request_model(self.model.name, self.model.version)

        async def handle(request: pb.PredictRequest) -> pb.ClassificationResult:
            return pb.ClassificationResult(classification=await self._predict_one(request, context))

        async for result in stream_results(requests, handle, _error_result,
                                           max_in_flight=self.max_stream_in_flight):
            yield result


def _error_result(index: int, err: ServingError) -> pb.ClassificationResult:
    return pb.ClassificationResult(error=pb.ItemError(index=index, code=err.code.name, message=err.message))
