"""Typed (per-model proto) APIs, described declaratively and served by one generic servicer.

Every typed service follows one proto convention (see protos/*/v1/*.proto):

    rpc Predict(PredictRequest) returns (PredictResponse);            // one item
    rpc PredictBatch(PredictBatchRequest) returns (PredictBatchResponse);  // N items, each answered
    rpc StreamPredict(stream PredictRequest) returns (stream <Result>);    // bidi, in order

where `PredictResponse.<answer>` is the item's answer, `<Result>` is `oneof {<answer>, ItemError error}`
and `PredictBatchResponse` has `repeated <Result> results`, `model_name`, `model_version`.
A `TypedApi` names those messages and supplies the two functions that are specific to the
model: `parse` (one item -> its tensors) and `wrap` (one item's outputs -> its answer message).
`TypedServicer` does the rest by calling the data plane, so a typed API is its proto plus a
parse/wrap pair, not a copied class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import grpc

from mlplatform.dataplane import DataPlane, RowAnswer, check_rows
from mlplatform.errors import ServingError, abort_on_serving_error
from mlplatform.model import Model, Tensors
from mlplatform.streaming import ordered_concurrent

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Message = Any
Context = grpc.aio.ServicerContext


def _no_options(model: Model, request: Message) -> None:
    return None


@dataclass(frozen=True)
class TypedApi:
    """A typed gRPC API: which proto messages it uses and how one item maps to tensors and back."""

    pb: ModuleType
    """The generated messages module (`fraud_pb2`)."""
    pb_grpc: ModuleType
    """The generated service module (`fraud_pb2_grpc`)."""
    service: str
    """The service's short name in the proto (`FraudService`)."""
    answer_field: str
    """Field of `PredictResponse` and of the result message that holds an item's answer (`prediction`)."""
    result: str
    """The per-item result message: oneof answer / `ItemError error` (`FraudResult`)."""
    batch_field: str
    """Repeated items of `PredictBatchRequest` (`transactions`)."""
    item_field: str | None
    """The item in `PredictRequest` (`transaction`); None when the request itself is the item."""
    parse: Callable[[Model, Message, str], Tensors]
    """One item -> its input tensors without the batch dimension; InvalidInputError naming `field` if bad."""
    wrap: Callable[[Model, Message, RowAnswer, Any], Message]
    """One item, its outputs and the request's options -> the answer message."""
    options: Callable[[Model, Message], Any] = _no_options
    """Request-level options checked before parsing (e.g. top_k); passed to `wrap`."""
    problem_format: str = "{field}.{problem}"
    """How a shape or row problem of an item reads, given the item's field (`transactions[3]`)."""
    parse_off_loop: Callable[[Sequence[Message]], bool] | None = None
    """Parse these items on a worker thread (e.g. large images to decode); None: always inline."""
    prepare: Callable[[Model, Sequence[Message], Sequence[str]], Awaitable[list[Any]]] | None = None
    """Async step before `parse` (e.g. read online features): items -> what `parse`, `cache_key` and `wrap`
    receive instead, or the ServingError of each bad item. None: items go to `parse` as they are."""
    cache_key: Callable[[Model, Any], str | None] | None = None
    """An item's identity for the prediction cache (e.g. customer + transaction fields), or None to key on its
    input tensors."""

    @property
    def full_name(self) -> str:
        """The fully-qualified service name (`fraud.v1.FraudService`), for health, reflection and routes."""
        return self.pb.DESCRIPTOR.services_by_name[self.service].full_name

    def add_to_server(self, server: grpc.aio.Server, dataplane: DataPlane, model_name: str, *,
                      max_stream_in_flight: int = 64) -> TypedServicer:
        """Register a `TypedServicer` for `model_name` on `server`."""
        servicer = TypedServicer(self, dataplane, model_name, max_stream_in_flight=max_stream_in_flight)
        getattr(self.pb_grpc, f"add_{self.service}Servicer_to_server")(servicer, server)
        return servicer


class TypedServicer:
    """Predict / PredictBatch / StreamPredict of a `TypedApi`: messages <-> tensors, the rest is the data plane."""

    def __init__(self, api: TypedApi, dataplane: DataPlane, model_name: str, *,
                 max_stream_in_flight: int = 64) -> None:
        self.api = api
        self.dataplane = dataplane
        self.model_name = model_name
        self.max_stream_in_flight = max_stream_in_flight
        self._result = getattr(api.pb, api.result)

    # -- items -> answers -------------------------------------------------------------

    async def _parse(self, model: Model, items: Sequence[Message], fields: Sequence[str]
                     ) -> list[Tensors | ServingError]:
        def parse_all() -> list[Tensors | ServingError]:
            out: list[Tensors | ServingError] = []
            for item, field in zip(items, fields, strict=True):
                if isinstance(item, ServingError):  # `prepare` refused it
                    out.append(item)
                    continue
                try:
                    out.append(self.api.parse(model, item, field))
                except ServingError as err:
                    out.append(err)
            return out

        off_loop = self.api.parse_off_loop
        return await asyncio.to_thread(parse_all) if off_loop and off_loop(items) else parse_all()

    async def _answers(self, request: Message, items: Sequence[Message], fields: Sequence[str],
                       batch: bool, context: Context) -> tuple[Model, list[Message | ServingError]]:
        api = self.api
        with self.dataplane.serving(self.model_name, request.model_version, "model_version") as predictor:
            model = predictor.model
            options = api.options(model, request)
            if api.prepare is not None:
                if batch:
                    check_rows(len(items), model.max_batch_size, api.batch_field)
                items = await api.prepare(model, items, fields)
            keys = [api.cache_key(model, i) if not isinstance(i, ServingError) else None for i in items] \
                if api.cache_key is not None else None
            answers = await self.dataplane.infer_rows(
                predictor, items, fields, self._parse, batch_field=api.batch_field if batch else None,
                problem_format=api.problem_format, timeout_s=context.time_remaining(), cache_keys=keys)
        return model, [a if isinstance(a, ServingError) else api.wrap(model, item, a, options)
                       for item, a in zip(items, answers, strict=True)]

    async def _parse_one(self, model: Model, item: Message, field: str) -> Tensors:
        off_loop = self.api.parse_off_loop
        if off_loop and off_loop([item]):
            return await asyncio.to_thread(self.api.parse, model, item, field)
        return self.api.parse(model, item, field)

    async def _predict_one(self, request: Message, context: Context) -> Message:
        api = self.api
        field = api.item_field
        item = getattr(request, field) if field else request
        with self.dataplane.serving(self.model_name, request.model_version, "model_version") as predictor:
            model = predictor.model
            options = api.options(model, request)
            if api.prepare is not None:
                [item] = await api.prepare(model, [item], [field or ""])
                if isinstance(item, ServingError):
                    raise item
            answer = await self.dataplane.infer_item(
                predictor, item, field or "", self._parse_one, problem_format=api.problem_format,
                timeout_s=context.time_remaining(),
                cache_key=api.cache_key(model, item) if api.cache_key is not None else None)
        return api.wrap(model, item, answer, options)

    def _error(self, index: int, err: ServingError) -> Message:
        return self._result(error=self.api.pb.ItemError(index=index, code=err.code.name, message=err.message))

    # -- RPCs -------------------------------------------------------------------------

    @abort_on_serving_error
    async def Predict(self, request: Message, context: Context) -> Message:
        answer = await self._predict_one(request, context)
        return self.api.pb.PredictResponse(**{self.api.answer_field: answer})

    @abort_on_serving_error
    async def PredictBatch(self, request: Message, context: Context) -> Message:
        api = self.api
        items = getattr(request, api.batch_field)
        fields = [f"{api.batch_field}[{i}]" for i in range(len(items))]
        model, answers = await self._answers(request, items, fields, True, context)
        results = [self._error(i, a) if isinstance(a, ServingError) else self._result(**{api.answer_field: a})
                   for i, a in enumerate(answers)]
        return api.pb.PredictBatchResponse(results=results, model_name=model.name, model_version=model.version)

    async def StreamPredict(self, requests: AsyncIterator[Message], context: Context
                            ) -> AsyncIterator[Message]:
        async def handle(request: Message) -> Message:
            return self._result(**{self.api.answer_field: await self._predict_one(request, context)})

        async for result in stream_results(requests, handle, self._error, max_in_flight=self.max_stream_in_flight):
            yield result


async def stream_results(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    on_error: Callable[[int, ServingError], Resp],
    *,
    max_in_flight: int = 64,
) -> AsyncIterator[Resp]:
    """One response per request, in order, handled concurrently; a ServingError becomes `on_error(index, err)`."""

    async def one(index: int, request: Req) -> Resp:
        try:
            return await handle(request)
        except ServingError as err:
            return on_error(index, err)

    async for response in ordered_concurrent(requests, one, max_in_flight=max_in_flight):
        yield response
