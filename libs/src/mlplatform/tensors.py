"""Tensor datatypes: Open Inference Protocol names <-> numpy dtypes, and shape checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}


class TensorSpec(BaseModel):
    """A named tensor: OIP datatype and shape, -1 for a variable dimension (the first is the batch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    datatype: str
    shape: tuple[int, ...]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in OIP_TO_NUMPY:
            raise ValueError(f"unknown datatype {v!r}; expected one of {sorted(OIP_TO_NUMPY)}")
        return v

    @field_validator("shape")
    @classmethod
    def _valid_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError(f"shape {list(v)} has a dimension that is neither -1 nor positive")
        return v

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of this tensor."""
        return OIP_TO_NUMPY[self.datatype]


def shape_matches(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """True when `actual` fits `expected`, where -1 in `expected` matches any size."""
    return len(actual) == len(expected) and all(e == -1 or a == e for a, e in zip(actual, expected, strict=True))


def shape_str(shape: Sequence[int]) -> str:
    """Render a shape as `[N, 30]` style text for error messages."""
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"
