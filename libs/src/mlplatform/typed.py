"""Building blocks of a typed (per-service proto) servicer, shared by every model service.

A typed servicer maps its proto messages to tensors and back; the checks and the
control flow around that are the same for every service and live here:
`check_version` (the served version or NOT_FOUND), `check_batch_size` (empty or
over-limit batches), `split_valid` (parse each item of a batch, keeping per-item
errors so one bad item never fails the others), `batch_results` (predict the good
items, answer every item in order) and `stream_results` (a bidi
stream answered in order, a bad message answered with its own error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mlplatform.errors import InvalidInputError, NotFoundError, ServingError
from mlplatform.model import Model
from mlplatform.streaming import ordered_concurrent

Item = TypeVar("Item")
Parsed = TypeVar("Parsed")
Answer = TypeVar("Answer")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def check_version(model: Model, requested: str, field_name: str = "model_version") -> None:
    """Raise NOT_FOUND unless `requested` is empty, "0" or the served version."""
    if requested not in ("", "0", model.version):
        raise NotFoundError(f"{field_name}: {model.name} has no version {requested!r} served; "
                            f"served version: {model.version}")


def check_batch_size(n: int, limit: int, field_name: str) -> None:
    """Raise INVALID_ARGUMENT for an empty batch or one over `limit` items, naming the field."""
    if n == 0:
        raise InvalidInputError(f"{field_name}: empty batch, at least one item is required")
    if n > limit:
        raise InvalidInputError(f"{field_name}: {n} items, at most {limit} per batch")


@dataclass
class Split(Generic[Parsed]):
    """A batch's items after parsing: the good ones (with their positions) and the errors by position."""

    indices: list[int] = field(default_factory=list)
    values: list[Parsed] = field(default_factory=list)
    errors: dict[int, ServingError] = field(default_factory=dict)


def split_valid(items: Sequence[Item], parse: Callable[[int, Item], Parsed]) -> Split[Parsed]:
    """Parse every item; a ServingError from `parse` is kept for that item instead of failing the batch."""
    out: Split[Parsed] = Split()
    for i, item in enumerate(items):
        try:
            value = parse(i, item)
        except ServingError as err:
            out.errors[i] = err
            continue
        out.indices.append(i)
        out.values.append(value)
    return out


async def batch_results(
    parsed: Split[Parsed],
    n: int,
    predict: Callable[[list[int], list[Parsed]], Awaitable[Sequence[Answer]]],
    ok: Callable[[Answer], Resp],
    on_error: Callable[[int, ServingError], Resp],
) -> list[Resp]:
    """One response per item of an n-item batch, in order: `ok(answer)` for each parsed item (predicted
    together in one `predict(indices, values)` call), `on_error(index, err)` for each item that failed to parse."""
    results: list[Resp | None] = [None] * n
    for i, err in parsed.errors.items():
        results[i] = on_error(i, err)
    if parsed.indices:
        answers = await predict(parsed.indices, parsed.values)
        for i, answer in zip(parsed.indices, answers, strict=True):
            results[i] = ok(answer)
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise ValueError(f"items {missing} got no answer (split of {n} items does not cover them)")
    return results  # type: ignore[return-value]


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
