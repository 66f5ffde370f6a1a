"""mlplatform.dataplane and mlplatform.typed: the version and batch-size rules, per-item checks that never
harm the other items, whole-request checks for OIP, and ordered streams with per-message errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
import pytest

from mlplatform.dataplane import DataPlane, RowAnswer, check_rows, check_version, row_shape_problem
from mlplatform.errors import InvalidInputError, NotFoundError, ServingError
from mlplatform.model import Model, Tensors
from mlplatform.tensors import TensorSpec
from mlplatform.typed import stream_results
from tests.libs import test_pipeline
from tests.libs.test_pipeline import rows

make_predictor = test_pipeline.make_predictor  # the fixture: a warmed-up Predictor around a real numpy model


@pytest.mark.parametrize(("requested", "chosen"), [("", "3"), ("0", "3"), ("3", "3"), ("1", "1")])
def test_empty_or_zero_version_means_the_newest_served(requested, chosen):
    assert check_version("digits", ["1", "3"], requested) == chosen


def test_other_version_is_not_found_and_names_the_field():
    with pytest.raises(NotFoundError) as err:
        check_version("digits", ["3"], "2", "images.model_version")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.message == "images.model_version: digits has no version '2' served; served version: 3"
    with pytest.raises(NotFoundError, match=r"^model 'digits' has no version '2' served; served versions: 1, 3$"):
        check_version("digits", ["1", "3"], "2")


def test_batch_size_limits_for_typed_items_and_oip_rows():
    check_rows(1, 4, "texts")
    check_rows(4, 4, "texts")
    with pytest.raises(InvalidInputError, match=r"^texts: empty batch, at least one item is required$"):
        check_rows(0, 4, "texts")
    with pytest.raises(InvalidInputError, match=r"^texts: 5 items, at most 4 per batch$"):
        check_rows(5, 4, "texts")
    with pytest.raises(InvalidInputError, match=r"^batch of 5 rows is over the limit of 4$"):
        check_rows(5, 4)
    with pytest.raises(InvalidInputError, match=r"^empty batch: at least one row is required$"):
        check_rows(0, 4)


@pytest.mark.parametrize(("row", "problem"), [
    (np.zeros(4, np.float32), None),
    (np.zeros(3, np.float32), "x: expected 4 values, got 3"),
    (np.zeros((2, 2), np.float32), "x: expected 4 values, got 2"),
    (np.zeros(4, np.float64), "x: datatype must be FP32"),
])
def test_row_shape_problem_names_the_tensor(row, problem):
    assert row_shape_problem(TensorSpec(name="x", datatype="FP32", shape=[-1, 4]), row) == problem


def test_row_shape_problem_for_a_multi_dimensional_tensor():
    spec = TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 2, 2])
    assert row_shape_problem(spec, np.zeros((1, 2, 2), np.float32)) is None
    assert row_shape_problem(spec, np.zeros((1, 3, 2), np.float32)) == "image: shape [1, 3, 2] does not match [1, 2, 2]"


async def _parse_numbers(model: Model, items: Sequence[str], fields: Sequence[str]) -> list[Tensors | ServingError]:
    out: list[Tensors | ServingError] = []
    for item, field in zip(items, fields, strict=True):
        if item == "bad":
            out.append(InvalidInputError(f"{field}: not a row"))
        else:
            out.append({"x": np.array([float(v) for v in item.split()], dtype=np.float32)})
    return out


async def test_infer_rows_answers_every_item_in_order_with_per_item_errors(make_predictor):
    predictor = await make_predictor(cache=False)
    plane = DataPlane({predictor.model.name: predictor})
    items = ["1 2 3 4", "bad", "1 2 3", "5 6 7 8", "nan 1 1 1"]
    fields = [f"rows[{i}]" for i in range(len(items))]
    with plane.serving(predictor.model.name) as held:
        assert held is predictor and predictor.in_flight == 1
        answers = await plane.infer_rows(held, items, fields, _parse_numbers, batch_field="rows")
    assert predictor.in_flight == 0
    assert isinstance(answers[0], RowAnswer) and float(answers[0].outputs["y"]) == 10.0
    assert isinstance(answers[3], RowAnswer) and float(answers[3].outputs["y"]) == 26.0
    assert answers[1].message == "rows[1]: not a row"
    assert answers[2].message == "rows[2].x: expected 4 values, got 3"
    assert isinstance(answers[4], RowAnswer)  # SumModel has no row checks: nan is its own answer
    assert [len(c) for c in predictor.model.calls] == [3]  # the good items in one runtime call


async def test_infer_rows_checks_version_and_batch_size_before_parsing(make_predictor):
    predictor = await make_predictor(cache=False)
    plane = DataPlane({predictor.model.name: predictor})
    name = predictor.model.name

    async def never(model: Model, items: Sequence[str], fields: Sequence[str]) -> list[Tensors | ServingError]:
        raise AssertionError("parsed before the request-level checks")

    with pytest.raises(NotFoundError, match=r"^model_version: sum-\d+ has no version '9' served"):
        plane.serving(name, "9", "model_version").__enter__()
    with pytest.raises(InvalidInputError, match=r"^rows: 9 items, at most 8 per batch$"):
        await plane.infer_rows(predictor, ["1 2 3 4"] * 9, ["r"] * 9, never, batch_field="rows")
    with pytest.raises(NotFoundError, match=r"^unknown model 'nope'; served: \['sum-\d+'\]$"):
        plane.serving("nope").__enter__()
    assert predictor.in_flight == 0


async def test_infer_checks_the_whole_request(make_predictor):
    predictor = await make_predictor(cache=False)
    plane = DataPlane({predictor.model.name: predictor})
    name = predictor.model.name
    out = await plane.infer(plane.predictor(name, "2"), {"x": rows(0, 1)}, outputs=["y"])
    np.testing.assert_allclose(out.outputs["y"], [6.0, 10.0])
    with pytest.raises(InvalidInputError, match=r"unknown requested output\(s\) \['z'\]"):
        await plane.infer(predictor, {"x": rows(0)}, outputs=["z"])
    with pytest.raises(InvalidInputError, match=r"^batch of 9 rows is over the limit of 8$"):
        await plane.infer(predictor, {"x": rows(*range(9))})
    with pytest.raises(NotFoundError, match=r"^model 'sum-\d+' has no version '1' served"):
        plane.predictor(name, "1")


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
