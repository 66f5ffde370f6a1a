"""The one request-handling layer that every transport calls: typed servicers, the Open Inference
Protocol servicer and bidi streams alike.

A transport turns its messages into tensors and hands them here; the data plane resolves the
model and version, checks the inputs (names, datatypes, shapes, batch limits, the model's own
row checks) and runs them through the model's `Predictor` (cache, breaker, batcher, fallback).
Two entry points, one rule set:

- `infer`: one request of N rows checked as a whole (OIP): a bad row fails the request.
- `infer_rows`: N independently parsed items (typed batches, streams): a bad item gets its own
  error, naming its field, and never harms the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlplatform import tracing
from mlplatform.errors import InvalidInputError, ModelNotReadyError, NotFoundError, ServingError
from mlplatform.interceptors import set_request_model
from mlplatform.model import Model, Tensors
from mlplatform.pipeline import Prediction, Predictor
from mlplatform.tensors import TensorSpec, shape_matches, shape_str

Item = Any
ParseFn = Callable[[Model, Sequence[Item], Sequence[str]], Awaitable[list[Tensors | ServingError]]]
"""Items of a request -> per item, its tensors (no batch dimension) or the error parsing it raised."""

SERVED_ALIASES = ("", "0")
"""Requested versions that mean "the default one" (the newest version served)."""


@dataclass(frozen=True)
class RowAnswer:
    """One item's outputs (batch dimension removed) and where they came from."""

    outputs: Mapping[str, np.ndarray]
    cached: bool
    fallback: bool


def check_version(name: str, served: Sequence[str], requested: str, field: str | None = None) -> str:
    """The served version a request asks for: the newest for "" or "0", else `requested` when served;
    NOT_FOUND otherwise (`field` names where the version came from)."""
    if requested in SERVED_ALIASES:
        return served[-1]
    if requested in served:
        return requested
    what = f"{field}: {name}" if field else f"model {name!r}"
    raise NotFoundError(f"{what} has no version {requested!r} served; served "
                        f"version{'s' if len(served) > 1 else ''}: {', '.join(served)}")


def check_rows(n: int, limit: int, field: str | None = None) -> None:
    """INVALID_ARGUMENT for an empty batch or one over `limit`; typed items when `field` is given, else rows."""
    if field is not None:
        if n == 0:
            raise InvalidInputError(f"{field}: empty batch, at least one item is required")
        if n > limit:
            raise InvalidInputError(f"{field}: {n} items, at most {limit} per batch")
        return
    if n == 0:
        raise InvalidInputError("empty batch: at least one row is required")
    if n > limit:
        raise InvalidInputError(f"batch of {n} rows is over the limit of {limit}")


def row_shape_problem(spec: TensorSpec, row: np.ndarray) -> str | None:
    """Why one item's tensor (no batch dimension) does not fit `spec`, naming the tensor; None if it fits."""
    if row.dtype != spec.numpy_dtype:
        return f"{spec.name}: datatype must be {spec.datatype}"
    dims = spec.shape[1:]
    if shape_matches(row.shape, dims):
        return None
    if len(dims) == 1 and dims[0] >= 0:
        got = row.shape[0] if row.ndim else 0
        return f"{spec.name}: expected {dims[0]} values, got {got}"
    return f"{spec.name}: shape {list(row.shape)} does not match {shape_str(dims)}"


@dataclass(frozen=True)
class ServedVersions:
    """The versions of one model that take traffic, by version string, ascending (the last is the default).
    Replaced as a whole on every change, so a request sees one consistent set."""

    predictors: Mapping[str, Predictor]
    versions: tuple[str, ...]


class DataPlane:
    """Models of this process by name, each version behind its own `Predictor`.

    The set of versions of a model changes in one assignment (`set_versions`, by the model manager):
    a request resolves its predictor once (`serving`) and keeps it until its answer, whatever changes
    meanwhile."""

    def __init__(self, predictors: Mapping[str, Predictor] | None = None) -> None:
        self._models: dict[str, ServedVersions] = {}
        self.unavailable: dict[str, str] = {}
        """Models with no version served (loading at start, or unloaded), with why: their requests get
        UNAVAILABLE with that message rather than NOT_FOUND."""
        for name, predictor in (predictors or {}).items():
            self.set_versions(name, {int(predictor.model.version): predictor})

    @property
    def names(self) -> list[str]:
        """Served model names, sorted."""
        return sorted(self._models)

    def ready(self) -> bool:
        """Some model is served and every version served is loaded and warmed up."""
        return bool(self._models) and all(p.model.ready for m in self._models.values()
                                          for p in m.predictors.values())

    def versions(self, name: str) -> dict[int, Predictor]:
        """The versions of `name` taking traffic (empty when none)."""
        served = self._models.get(name)
        return {int(v): p for v, p in served.predictors.items()} if served else {}

    def set_versions(self, name: str, predictors: Mapping[int, Predictor]) -> None:
        """Make exactly `predictors` the versions of `name` that take traffic (none: the model is unloaded)."""
        if predictors:
            ordered = {str(v): predictors[v] for v in sorted(predictors)}
            self._models[name] = ServedVersions(ordered, tuple(ordered))
            self.unavailable.pop(name, None)
        elif self._models.pop(name, None) is not None:
            self.unavailable[name] = f"model {name!r} is not loaded (unloaded through the model repository API)"

    @property
    def known(self) -> set[str]:
        """Models served, loading or unloaded (anything else is NOT_FOUND)."""
        return {*self._models, *self.unavailable}

    def predictor(self, name: str, version: str = "", field: str | None = None) -> Predictor:
        """The predictor of `name` at `version` (see `check_version`); NOT_FOUND for an unknown model or
        version, UNAVAILABLE for a known model with no version loaded."""
        served = self._models.get(name)
        if served is None:
            if name in self.unavailable:
                raise ModelNotReadyError(self.unavailable[name])
            raise NotFoundError(f"unknown model {name!r}; served: {self.names}")
        predictor = served.predictors[check_version(name, served.versions, version, field)]
        set_request_model(predictor.model.name, predictor.model.version)
        tracing.annotate(**{"model.name": predictor.model.name, "model.version": predictor.model.version})
        return predictor

    def version_ready(self, name: str, version: str = "") -> bool:
        """ModelReady: the default version ("" or "0") or `version` is served and warmed up; False for a version
        not served (yet, or any more)."""
        served = self._models.get(name)
        if served is None:
            return False
        chosen = served.versions[-1] if version in SERVED_ALIASES else version
        predictor = served.predictors.get(chosen)
        return predictor is not None and predictor.model.ready

    @contextmanager
    def serving(self, name: str, version: str = "", field: str | None = None) -> Iterator[Predictor]:
        """Resolve `name` at `version` once and hold it (in flight) for the whole request."""
        with self.predictor(name, version, field).serving() as predictor:
            yield predictor

    def model(self, name: str, version: str = "") -> Model:
        """The served model `name` at `version`, or NOT_FOUND."""
        return self.predictor(name, version).model

    async def infer(self, predictor: Predictor, inputs: Tensors, *, outputs: Sequence[str] = (),
                    timeout_s: float | None = None) -> Prediction:
        """Check a whole request (tensor names, datatypes, shapes, limits, every row) and predict it with
        `predictor` (resolved by `serving`).

        `outputs` are the outputs asked for (empty: all); an unknown one is INVALID_ARGUMENT.
        """
        model = predictor.model
        check_rows(model.check_inputs(inputs), model.max_batch_size)
        problems = [(i, p) for i, p in enumerate(model.validate_rows(inputs)) if p]
        if problems:
            shown = "; ".join(f"row {i}: {p}" for i, p in problems[:5])
            more = f" (and {len(problems) - 5} more rows)" if len(problems) > 5 else ""
            raise InvalidInputError(f"invalid input: {shown}{more}")
        known = {s.name for s in model.outputs}
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise InvalidInputError(f"unknown requested output(s) {unknown}; model outputs: {sorted(known)}")
        return await predictor.predict(inputs, timeout_s=timeout_s)

    async def infer_item(
        self,
        predictor: Predictor,
        item: Item,
        field: str,
        parse: Callable[[Model, Item, str], Awaitable[Tensors]],
        *,
        problem_format: str = "{field}.{problem}",
        timeout_s: float | None = None,
        cache_key: str | None = None,
    ) -> RowAnswer:
        """`infer_rows` for one item, without its per-list bookkeeping (the typed `Predict` and stream
        messages): the same checks in the same order; a bad item raises its ServingError. `cache_key`: the
        item's identity for the prediction cache (None: its input tensors)."""
        model = predictor.model
        predictor.admit(1, timeout_s)
        with tracing.span("validate", **{"model.name": model.name, "model.version": model.version, "rows": 1}):
            row = await parse(model, item, field)
            problem = _row_problem(model.inputs, row)
            if problem:
                raise InvalidInputError(_located(problem_format, field, problem))
            inputs: Tensors = {s.name: row[s.name][np.newaxis] for s in model.inputs}
            [problem] = model.validate_rows(inputs)
            if problem:
                raise InvalidInputError(_located(problem_format, field, problem))
        prediction = await predictor.predict(inputs, timeout_s=timeout_s,
                                             keys=[cache_key] if cache_key is not None else None)
        return RowAnswer({k: v[0] for k, v in prediction.outputs.items()},
                         bool(prediction.cached[0]), bool(prediction.fallback[0]))

    async def infer_rows(
        self,
        predictor: Predictor,
        items: Sequence[Item],
        fields: Sequence[str],
        parse: ParseFn,
        *,
        batch_field: str | None = None,
        problem_format: str = "{field}.{problem}",
        timeout_s: float | None = None,
        cache_keys: Sequence[str | None] | None = None,
    ) -> list[RowAnswer | ServingError]:
        """Predict independently parsed items together; one answer or error per item, in order.

        `predictor` comes from `serving` (which checked the model and version). Order of checks: batch
        size (`batch_field` names the repeated field; None: a single item, not checked), then
        `parse(model, items, fields)`, which turns item i into its tensors without the batch dimension
        or the ServingError its parsing raised, then each item's tensors against the model's inputs
        and the model's row checks.
        `fields[i]` says where item i lives in the request (e.g. `transactions[3]`); a shape or
        row problem reads `problem_format.format(field=..., problem=...)` (the bare problem
        when the field is empty). `cache_keys[i]`: item i's identity for the prediction cache (None: its
        input tensors).
        """
        model = predictor.model
        if batch_field is not None:
            check_rows(len(items), model.max_batch_size, batch_field)
        predictor.admit(len(items), timeout_s)
        with tracing.span("validate", **{"model.name": model.name, "model.version": model.version,
                                         "rows": len(items)}):
            rows = await parse(model, items, fields)
        answers: list[RowAnswer | ServingError | None] = [None] * len(rows)
        good: list[int] = []
        for i, row in enumerate(rows):
            if isinstance(row, ServingError):
                answers[i] = row
                continue
            problem = _row_problem(model.inputs, row)
            if problem:
                answers[i] = InvalidInputError(_located(problem_format, fields[i], problem))
            else:
                good.append(i)
        if good:
            inputs: Tensors = {s.name: np.stack([rows[i][s.name] for i in good])  # type: ignore[index]
                               for s in model.inputs}
            problems = model.validate_rows(inputs)
            if any(problems):
                keep = [j for j, p in enumerate(problems) if not p]
                for j, p in enumerate(problems):
                    if p:
                        answers[good[j]] = InvalidInputError(_located(problem_format, fields[good[j]], p))
                good = [good[j] for j in keep]
                inputs = {k: v[keep] for k, v in inputs.items()} if keep else {}
            if good:
                keys = [cache_keys[i] for i in good] if cache_keys is not None else None
                prediction = await predictor.predict(inputs, timeout_s=timeout_s, keys=keys)
                for j, i in enumerate(good):
                    answers[i] = RowAnswer({k: v[j] for k, v in prediction.outputs.items()},
                                           bool(prediction.cached[j]), bool(prediction.fallback[j]))
        return answers  # type: ignore[return-value]


def _row_problem(specs: Sequence[TensorSpec], row: Tensors) -> str | None:
    names = {s.name for s in specs}
    if row.keys() != names:
        return f"tensors {sorted(row)} do not match the model's inputs {sorted(names)}"
    for spec in specs:
        problem = row_shape_problem(spec, row[spec.name])
        if problem:
            return problem
    return None


def _located(problem_format: str, field: str, problem: str) -> str:
    return problem_format.format(field=field, problem=problem) if field else problem
