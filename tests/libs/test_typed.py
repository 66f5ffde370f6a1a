"""mlplatform.typed: version and batch-size checks, per-item parsing, ordered streams with per-message errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest

from mlplatform.errors import InvalidInputError, NotFoundError, ServingError
from mlplatform.typed import batch_results, check_batch_size, check_version, split_valid, stream_results

MODEL = SimpleNamespace(name="digits", version="3")


@pytest.mark.parametrize("requested", ["", "0", "3"])
def test_served_version_accepted(requested):
    check_version(MODEL, requested)  # type: ignore[arg-type]


def test_other_version_is_not_found_and_names_the_field():
    with pytest.raises(NotFoundError) as err:
        check_version(MODEL, "2", "images.model_version")  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.message == "images.model_version: digits has no version '2' served; served version: 3"


def test_batch_size_limits():
    check_batch_size(1, 4, "texts")
    check_batch_size(4, 4, "texts")
    with pytest.raises(InvalidInputError, match=r"^texts: empty batch, at least one item is required$"):
        check_batch_size(0, 4, "texts")
    with pytest.raises(InvalidInputError, match=r"^texts: 5 items, at most 4 per batch$"):
        check_batch_size(5, 4, "texts")


def test_split_valid_keeps_good_items_in_order_and_errors_by_index():
    def parse(i: int, item: str) -> int:
        if not item.isdigit():
            raise InvalidInputError(f"items[{i}]: {item!r} is not a number")
        return int(item)

    out = split_valid(["1", "x", "3", "", "5"], parse)
    assert out.indices == [0, 2, 4]
    assert out.values == [1, 3, 5]
    assert sorted(out.errors) == [1, 3]
    assert out.errors[1].message == "items[1]: 'x' is not a number"


def test_split_valid_lets_unexpected_errors_through():
    def parse(i: int, item: str) -> str:
        raise KeyError(item)

    with pytest.raises(KeyError):
        split_valid(["a"], parse)


async def test_stream_results_answers_each_message_in_order_with_its_own_error():
    async def requests() -> AsyncIterator[int]:
        for n in [4, -1, 9, -2, 16]:
            yield n

    async def handle(n: int) -> str:
        if n < 0:
            raise InvalidInputError(f"negative: {n}")
        return f"sqrt={int(n ** 0.5)}"

    def on_error(index: int, err: ServingError) -> str:
        return f"error[{index}] {err.code.name}: {err.message}"

    out = [r async for r in stream_results(requests(), handle, on_error, max_in_flight=2)]
    assert out == ["sqrt=2", "error[1] INVALID_ARGUMENT: negative: -1", "sqrt=3",
                   "error[3] INVALID_ARGUMENT: negative: -2", "sqrt=4"]


async def test_batch_results_predicts_good_items_together_and_answers_every_item_in_order():
    def parse(i: int, item: str) -> int:
        if not item.isdigit():
            raise InvalidInputError(f"items[{i}]: not a number")
        return int(item)

    calls: list[tuple[list[int], list[int]]] = []

    async def predict(indices: list[int], values: list[int]) -> list[int]:
        calls.append((indices, values))
        return [v * v for v in values]

    items = ["3", "x", "4", "y"]
    out = await batch_results(split_valid(items, parse), len(items), predict, lambda v: f"ok {v}",
                              lambda i, err: f"error[{i}] {err.message}")
    assert out == ["ok 9", "error[1] items[1]: not a number", "ok 16", "error[3] items[3]: not a number"]
    assert calls == [([0, 2], [3, 4])]  # one predict call for the good items


async def test_batch_results_with_no_good_item_does_not_predict():
    async def predict(indices: list[int], values: list[int]) -> list[int]:
        raise AssertionError("predict called for an all-bad batch")

    def parse(i: int, item: str) -> int:
        raise InvalidInputError(f"items[{i}]: bad")

    out = await batch_results(split_valid(["a", "b"], parse), 2, predict, str, lambda i, err: err.message)
    assert out == ["items[0]: bad", "items[1]: bad"]
