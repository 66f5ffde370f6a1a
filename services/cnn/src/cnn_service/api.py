"""cnn.v1.CnnService: images or pixel tensors -> model input; probabilities -> top-k classes.

Everything else (version, limits, cache, batching, breaker, metrics) is the shared data plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cnn.v1 import cnn_pb2 as pb
from cnn.v1 import cnn_pb2_grpc as pb_grpc

from cnn_service.images import decode_image, pixels_from_tensor
from cnn_service.model import INPUT, PROBABILITIES, CnnModel
from cnn_service.settings import CnnSettings
from mlplatform.dataplane import RowAnswer
from mlplatform.errors import InvalidInputError
from mlplatform.model import Tensors
from mlplatform.server import ServiceSpec
from mlplatform.typed import TypedApi

# Encoded images larger than this (in total, per request) are decoded on a worker thread, off the event loop.
DECODE_INLINE_BYTES = 64 * 1024

Input = pb.PredictRequest | pb.ImageInput


def parse(model: CnnModel, item: Input, field: str) -> Tensors:
    """One image or tensor as float32 pixels [1, H, W], or InvalidInputError naming the field."""
    prefix = f"{field}." if field else ""
    which = item.WhichOneof("input")
    if which == "image":
        pixels = decode_image(item.image, model.limits, f"{prefix}image")
    elif which == "tensor":
        t = item.tensor
        pixels = pixels_from_tensor(t.shape, t.datatype, t.fp32_contents, t.raw_contents, model.limits,
                                    f"{prefix}tensor")
    else:
        raise InvalidInputError(f"{prefix}input: set image (PNG, JPEG or BMP bytes) or tensor (pixels)")
    return {INPUT: pixels[np.newaxis].astype(np.float32, copy=False)}


def large_images(items: Sequence[Input]) -> bool:
    """Whether decoding these items is worth a worker thread."""
    return sum(len(item.image) for item in items if item.WhichOneof("input") == "image") > DECODE_INLINE_BYTES


def top_k(model: CnnModel, request: pb.PredictRequest | pb.PredictBatchRequest) -> int:
    """Classes to return: the request's top_k (0: the model's default), checked against the class count."""
    n, requested = model.num_classes, request.top_k
    if requested == 0:
        return model.default_top_k
    if not 1 <= requested <= n:
        raise InvalidInputError(f"top_k: {requested} is out of range 1..{n} "
                                f"(0 means the model's default, {model.default_top_k})")
    return requested


def wrap(model: CnnModel, item: Input, answer: RowAnswer, k: int) -> pb.Classification:
    """The k most probable classes, best first."""
    probs = answer.outputs[PROBABILITIES]
    order = np.argsort(-probs, kind="stable")[:k]
    classes = [pb.ClassScore(label=model.labels[c], class_index=int(c), probability=float(probs[c])) for c in order]
    return pb.Classification(id=item.id, classes=classes, model_name=model.name, model_version=model.version,
                             cached=answer.cached)


API = TypedApi(pb=pb, pb_grpc=pb_grpc, service="CnnService", answer_field="classification",
               result="ClassificationResult", batch_field="inputs", item_field=None, parse=parse, wrap=wrap,
               options=top_k, parse_off_loop=large_images)

SPEC = ServiceSpec(name="cnn", default_model="cnn", model_factory=CnnModel, settings_cls=CnnSettings,
                   typed_api=API)
