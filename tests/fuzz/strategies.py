"""Hypothesis strategies for malformed and well-formed gRPC requests, and the oracles that say what the
platform must answer to each (tests/fuzz).

Requests are built as protobuf messages with tritonclient's own generated OIP stubs (never ours: see
tests/conftest.py) and with the typed `fraud.v1`, `cnn.v1` and `sentiment.v1` messages. An oracle reads the
message back, as the server would, and says whether the request must succeed (and on which rows), or which
client error it must get.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass

import grpc
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip

PROFILE_ENV = "HYPOTHESIS_PROFILE"
"""Environment variable naming the Hypothesis profile: `ci` (default, `make test`) or `long` (`make chaos`)."""

LONG_FACTOR = 20
"""How many more examples each property gets under `long`."""

_COMMON = dict(deadline=None, print_blob=True, report_multiple_bugs=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.large_base_example])
settings.register_profile("ci", parent=settings.get_profile("ci"), derandomize=True, database=None, **_COMMON)
"""Hypothesis' own `ci` profile (which it loads where it detects CI), refined: the same examples on every run
(a failure reproduces), no deadline (a busy machine's timing noise)."""
settings.register_profile("long", **_COMMON)
"""Fresh examples on every run; a failure prints its reproduction blob."""


def fuzz_settings(n: int) -> settings:
    """The selected profile with `n` examples (`ci`), or LONG_FACTOR times as many (`long`). Applied per test,
    so that loading these profiles never changes other tests' Hypothesis settings."""
    profile = os.environ.get(PROFILE_ENV, "ci")
    if profile not in ("ci", "long"):
        raise ValueError(f"{PROFILE_ENV}={profile!r}: expected ci or long")
    return settings(settings.get_profile(profile), max_examples=n * LONG_FACTOR if profile == "long" else n)


CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
"""The documented client-error statuses: anything else but OK (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, ...) is a bug."""

OIP_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64", "BYTES"]
JUNK_DATATYPES = ["", "fp32", "FP8", "BF16", "STRING", "FLOAT", "FP32 ", "\x00"]
CONTENTS_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-2**31, 2**31 - 1),
    "int64_contents": st.integers(-2**63, 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=16),
}
HUGE_DIMS = [2**31, 2**32 + 30, 2**40, 2**53, 2**62, 2**63 - 1]



def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, percent: int = 85) -> st.SearchStrategy:
    """`common` `percent`% of the time, else `rare` (so that most requests get past the first check)."""
    return st.integers(0, 99).flatmap(lambda i: common if i < percent else rare)


versions = mostly(st.sampled_from(["", "1", "0"]), st.one_of(
    st.sampled_from(["2", "-1", "01", " 1", "1.0", "99999999999999999999"]), st.text(max_size=8)), 75)
"""Model versions: mostly served ones, then unknown ones (the fraud, cnn and sentiment models serve only "1")."""

dims = st.one_of(st.integers(-3, 40), st.sampled_from(HUGE_DIMS), st.integers(-2**63, -1))
shapes = st.lists(dims, max_size=5)
"""Any shape: negative, zero, huge, any rank."""


def huge_text(alphabet: str = "x") -> st.SearchStrategy[str]:
    """Cheap long strings (up to 200k characters) alongside short random ones."""
    return st.one_of(st.text(max_size=40),
                     st.builds(lambda c, n: c * n, st.sampled_from(list(alphabet)), st.integers(1000, 200_000)))


# -- Open Inference Protocol ------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """What a request must get: `rows` (the decoded valid input) for OK, else the client error status."""

    code: grpc.StatusCode
    rows: np.ndarray | None = None


@st.composite
def parameters(draw: st.DrawFn) -> dict[str, oip.InferParameter]:
    """Request parameters of every type and odd values (the server ignores the ones it does not know)."""
    kinds = {
        "bool_param": st.booleans(), "int64_param": st.integers(-2**63, 2**63 - 1),
        "string_param": st.text(max_size=30), "double_param": st.floats(), "uint64_param": st.integers(0, 2**64 - 1),
    }
    out = {}
    for key in draw(st.lists(st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output", "",
                                              "x" * 300, "classification", "cached_rows"]), max_size=3, unique=True)):
        kind = draw(st.sampled_from(sorted(kinds)))
        out[key] = oip.InferParameter(**{kind: draw(kinds[kind])})
    return out


@st.composite
def random_tensor(draw: st.DrawFn, names: list[str]) -> tuple[oip.ModelInferRequest.InferInputTensor, bytes | None]:
    """A tensor with any name, datatype, shape and contents (or raw bytes of any length)."""
    t = oip.ModelInferRequest.InferInputTensor(
        name=draw(st.one_of(st.sampled_from(names), st.text(max_size=10))),
        datatype=draw(st.sampled_from(OIP_DATATYPES + JUNK_DATATYPES)),
        shape=draw(shapes))
    if draw(st.booleans()):
        return t, draw(st.binary(max_size=512))
    field = draw(st.sampled_from(sorted(CONTENTS_FIELDS)))
    getattr(t.contents, field).extend(draw(st.lists(CONTENTS_FIELDS[field], max_size=64)))
    return t, None


@st.composite
def oip_requests(draw: st.DrawFn, model: str, input_name: str, rows: np.ndarray,
                 outputs: tuple[str, ...]) -> oip.ModelInferRequest:
    """ModelInfer requests for a model with one FP32 input [N, D] (fraud): valid ones built from `rows`, the
    same with one thing broken, and random ones; unknown models and versions; odd parameters."""
    req = oip.ModelInferRequest(
        model_name=draw(mostly(st.just(model), st.one_of(st.sampled_from(["Fraud", "", f"{model} ", "cnn", "nope"]),
                                                         st.text(max_size=12)))),
        model_version=draw(versions), id=draw(st.text(max_size=20)))
    for key, value in draw(parameters()).items():
        req.parameters[key].CopyFrom(value)
    kind = draw(st.sampled_from(["valid", "valid", "broken", "broken", "broken", "random"]))
    if kind == "random":
        tensors = draw(st.lists(random_tensor([input_name, "x"]), max_size=3))
        raws = [r for _, r in tensors]
        for t, _ in tensors:
            req.inputs.append(t)
        if raws and any(r is not None for r in raws):
            req.raw_input_contents.extend(r or b"" for r in raws)
    else:
        n = draw(st.integers(1, 8))
        start = draw(st.integers(0, len(rows) - n))
        data = rows[start:start + n]
        t = req.inputs.add(name=input_name, datatype="FP32", shape=list(data.shape))
        raw = draw(st.booleans())
        if raw:
            req.raw_input_contents.append(data.astype("<f4").tobytes())
        else:
            t.contents.fp32_contents.extend(data.ravel().tolist())
        if kind == "broken":
            _break(draw, req, raw, data)
    for name in draw(st.lists(st.sampled_from([*outputs, "nope", ""]), max_size=3)):
        req.outputs.add(name=name)
    return req


def _break(draw: st.DrawFn, req: oip.ModelInferRequest, raw: bool, data: np.ndarray) -> None:
    """Break one thing of a valid single-input request."""
    t = req.inputs[0]
    how = draw(st.sampled_from(["shape", "huge_shape", "declared", "declared", "datatype", "length", "name", "value",
                                "extra_input", "duplicate", "raw_count", "rank", "batch"]))
    if how == "shape":
        t.ClearField("shape")
        t.shape.extend(draw(shapes))
    elif how == "huge_shape":  # a huge declared shape with the small data, of any datatype, maybe with a 0
        t.shape[draw(st.integers(0, 1))] = draw(st.sampled_from(HUGE_DIMS))
        if draw(st.booleans()):
            t.shape.append(draw(st.sampled_from([0, 1, *HUGE_DIMS])))
        if draw(st.booleans()):
            t.datatype = draw(st.sampled_from(OIP_DATATYPES))
    elif how == "declared":  # huge or zero-sized declared shapes, any datatype, little or no data
        t.ClearField("shape")
        t.shape.extend(draw(st.lists(st.sampled_from([0, 1, 30, *HUGE_DIMS]), min_size=1, max_size=4)))
        t.datatype = draw(st.sampled_from([*OIP_DATATYPES, "BYTES", "BYTES"]))
        t.ClearField("contents")
        if raw:
            req.raw_input_contents[0] = draw(st.one_of(st.just(b""), st.binary(max_size=16),
                                                       st.just(b"\1\0\0\0a" * 3)))
    elif how == "datatype":
        t.datatype = draw(st.sampled_from([d for d in OIP_DATATYPES + JUNK_DATATYPES if d != "FP32"]))
    elif how == "length":
        k = draw(st.integers(1, 8))
        if raw:
            cut = draw(st.booleans())
            req.raw_input_contents[0] = req.raw_input_contents[0][:-k] if cut else req.raw_input_contents[0] + b"\0" * k
        else:
            values = list(t.contents.fp32_contents)
            t.contents.ClearField("fp32_contents")
            t.contents.fp32_contents.extend(values[:-k] if draw(st.booleans()) else values + [0.0] * k)
    elif how == "name":
        t.name = draw(st.text(max_size=10).filter(lambda s: s != t.name))
    elif how == "value":
        flat = data.ravel().copy()
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1e30, 3e38, -1.0]))
        if raw:
            req.raw_input_contents[0] = flat.astype("<f4").tobytes()
        else:
            t.contents.ClearField("fp32_contents")
            t.contents.fp32_contents.extend(flat.tolist())
    elif how == "extra_input":
        extra = req.inputs.add(name=draw(st.sampled_from(["x", "features2", ""])), datatype="FP32", shape=[1])
        if raw:
            req.raw_input_contents.append(b"\0\0\0\0")
        else:
            extra.contents.fp32_contents.append(0.0)
    elif how == "duplicate":
        req.inputs.append(t)
        if raw:
            req.raw_input_contents.append(req.raw_input_contents[0])
    elif how == "raw_count":
        req.raw_input_contents.append(draw(st.binary(max_size=16)))
    elif how == "rank":
        t.ClearField("shape")
        t.shape.extend(draw(st.sampled_from([[data.size], [1, *data.shape], [data.shape[0], 1, data.shape[1]],
                                             []])))
    elif how == "batch":  # over the batch limit: repeat the rows
        big = np.tile(data, (math.ceil(300 / len(data)), 1))
        t.ClearField("shape")
        t.shape.extend(big.shape)
        if raw:
            req.raw_input_contents[0] = big.astype("<f4").tobytes()
        else:
            t.contents.ClearField("fp32_contents")
            t.contents.fp32_contents.extend(big.ravel().tolist())


def oip_expectation(req: oip.ModelInferRequest, model: str, input_name: str, bounds: tuple[np.ndarray, np.ndarray],
                    outputs: tuple[str, ...], max_batch: int) -> Expect:
    """What the server must answer to `req` for a model with one FP32 input [N, D] whose rows must lie within
    `bounds` (the fraud model), served as version "1" only."""
    bad = Expect(grpc.StatusCode.INVALID_ARGUMENT)
    if req.model_name != model or req.model_version not in ("", "0", "1"):
        return Expect(grpc.StatusCode.NOT_FOUND)
    lo, hi = bounds
    if len(req.inputs) != 1 or len(req.raw_input_contents) not in (0, 1):
        return bad
    t = req.inputs[0]
    shape = list(t.shape)
    if t.name != input_name or t.datatype != "FP32" or len(shape) != 2 or shape[1] != lo.size \
            or not 1 <= shape[0] <= max_batch:
        return bad
    count = shape[0] * shape[1]
    if req.raw_input_contents:
        raw = req.raw_input_contents[0]
        if len(raw) != 4 * count:
            return bad
        data = np.frombuffer(raw, "<f4").astype(np.float32)
    else:
        if len(t.contents.fp32_contents) != count:
            return bad
        data = np.asarray(t.contents.fp32_contents, np.float32)
    rows = data.reshape(shape)
    if not ((rows >= lo) & (rows <= hi)).all():
        return bad
    if any(o.name not in outputs for o in req.outputs):
        return bad
    return Expect(grpc.StatusCode.OK, rows)


def names_a_field(message: str, req: oip.ModelInferRequest) -> bool:
    """The error message says what was wrong: a tensor of the request, or the part of it at fault."""
    tokens = [repr(t.name) for t in req.inputs] + [repr(o.name) for o in req.outputs]
    tokens += ["raw_input_contents", "batch", "row ", "output", "input tensor", "version", "model"]
    return any(tok in message for tok in tokens)


# -- fraud.v1 ------------------------------------------------------------------------------

CARD_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ODD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 1e30, -1e30, 3.4e38, 1e-45]


@st.composite
def fraud_features(draw: st.DrawFn, rows: np.ndarray) -> list[float]:
    """30 valid feature values from real rows, or the same with values broken, dropped or added."""
    row = rows[draw(st.integers(0, len(rows) - 1))].tolist()
    how = draw(mostly(st.just("valid"), st.sampled_from(["value", "values", "short", "long", "empty", "random"]), 40))
    if how == "value":
        row[draw(st.integers(0, 29))] = draw(st.one_of(st.sampled_from(ODD_FLOATS), st.floats(width=32)))
    elif how == "values":
        for i in draw(st.lists(st.integers(0, 29), min_size=1, max_size=30)):
            row[i] = draw(st.floats(width=32))
    elif how == "short":
        row = row[:draw(st.integers(1, 29))]
    elif how == "long":
        row = row + [0.0] * draw(st.sampled_from([1, 2, 30, 1000, 100_000]))
    elif how == "empty":
        row = []
    elif how == "random":
        row = draw(st.lists(st.floats(width=32), max_size=40))
    return row


@st.composite
def fraud_transactions(draw: st.DrawFn, rows: np.ndarray, pb) -> object:
    """Transactions: by features (valid or broken), by card_id with odd fields, or both at once."""
    tx = pb.Transaction(transaction_id=draw(huge_text("t7é")))
    kind = draw(st.sampled_from(["features", "features", "features", "card", "card", "both", "nothing"]))
    if kind in ("features", "both"):
        tx.features.extend(draw(fraud_features(rows)))
    if kind in ("card", "both"):
        tx.card_id = draw(mostly(st.from_regex(CARD_ID, fullmatch=True),
                                 st.one_of(huge_text("c"), st.text(max_size=70))))
        tx.amount = draw(mostly(st.floats(0.01, 1e6), st.sampled_from([0.0, -5.0, 1e6 + 1, math.nan, math.inf])))
        tx.channel = draw(mostly(st.integers(1, 3), st.sampled_from([0, 4, 5, -1, 2**31 - 1])))
        tx.timestamp = draw(mostly(st.one_of(st.just(0), st.integers(0, 1_700_000_000)),
                                   st.integers(-2**63, 2**63 - 1)))
        tx.merchant_category = draw(mostly(st.sampled_from(["", "5411", "7995"]), st.text(max_size=6)))
        tx.merchant_country = draw(mostly(st.sampled_from(["", "FR", "de"]), st.text(max_size=3)))
        tx.latitude = draw(mostly(st.floats(-90, 90), st.floats()))
        tx.longitude = draw(mostly(st.floats(-180, 180), st.floats()))
        tx.new_device = draw(st.booleans())
    return tx


def fraud_features_valid(features: list[float], bounds: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether a features transaction must be scored: 30 values, each finite and within its feature's range."""
    lo, hi = bounds
    row = np.asarray(features, np.float32)
    return row.size == lo.size and bool(((row >= lo) & (row <= hi)).all())


def card_transaction_valid(tx, now: float) -> bool:
    """Whether a scoring-by-card transaction must be scored (fraud_service.online.check, re-stated)."""
    return (CARD_ID.match(tx.card_id) is not None and math.isfinite(tx.amount) and 0 < tx.amount <= 1e6
            and tx.channel in (1, 2, 3)
            and (not tx.merchant_category or re.fullmatch(r"[0-9]{4}", tx.merchant_category) is not None)
            and (not tx.merchant_country or re.fullmatch(r"[A-Za-z]{2}", tx.merchant_country) is not None)
            and math.isfinite(tx.latitude) and -90 <= tx.latitude <= 90
            and math.isfinite(tx.longitude) and -180 <= tx.longitude <= 180
            and 0 <= tx.timestamp <= now + 86400)


# -- cnn.v1 --------------------------------------------------------------------------------

def png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of `pixels`."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What the cnn service makes of an image file: grayscale, resized (bilinear) to 32x32, float32 pixels."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    gray = img if img.mode == "L" else img.convert("L")
    if gray.size != (32, 32):
        gray = gray.resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32)


def tensor_pixels(t) -> np.ndarray | None:
    """The pixels of a cnn.v1 PixelTensor the service must accept, or None when it must refuse it (the rules of
    cnn_service.images.pixels_from_tensor, re-stated)."""
    if t.datatype not in ("FP32", "UINT8") or list(t.shape) not in ([32, 32], [1, 32, 32]):
        return None
    if len(t.fp32_contents) and t.raw_contents:
        return None
    if len(t.fp32_contents):
        if t.datatype != "FP32" or len(t.fp32_contents) != 1024:
            return None
        pixels = np.asarray(t.fp32_contents, np.float32)
    elif t.raw_contents:
        dtype = np.dtype("<f4") if t.datatype == "FP32" else np.dtype(np.uint8)
        if len(t.raw_contents) != 1024 * dtype.itemsize:
            return None
        pixels = np.frombuffer(t.raw_contents, dtype).astype(np.float32)
    else:
        return None
    if not (np.isfinite(pixels).all() and ((pixels >= 0) & (pixels <= 255)).all()):
        return None
    return pixels.reshape(32, 32)


@dataclass(frozen=True)
class CnnCase:
    """An ImageInput and what it must get: `pixels` the model must see when `must` (else it must be refused,
    or, when `pixels` is given anyway -- a truncated file PIL can still read -- answered as those pixels)."""

    item: object
    pixels: np.ndarray | None
    must: bool


@st.composite
def cnn_inputs(draw: st.DrawFn, pb, kinds: tuple[str, ...] = ("pixels", "pixels", "png", "garbage", "truncated",
                                                              "tensor", "tensor", "nothing")) -> CnnCase:
    """ImageInputs of `kinds`: valid pixel tensors, PNGs of any size, garbage or truncated image bytes, crafted
    headers, tensors with wrong shapes, datatypes, lengths or values, no input."""
    kind = draw(st.sampled_from(kinds))
    item = pb.ImageInput(id=draw(huge_text("i")))
    if kind == "pixels":
        pixels = draw(st.integers(0, 2**32 - 1).map(
            lambda s: np.random.default_rng(s).integers(0, 256, (32, 32)).astype(np.float32)))
        if draw(st.booleans()):
            item.tensor.CopyFrom(pb.PixelTensor(shape=[32, 32], datatype="FP32", fp32_contents=pixels.ravel()))
        else:
            item.tensor.CopyFrom(pb.PixelTensor(shape=draw(st.sampled_from([[32, 32], [1, 32, 32]])),
                                                datatype="UINT8", raw_contents=pixels.astype(np.uint8).tobytes()))
        return CnnCase(item, pixels, True)
    if kind == "png":
        h, w, seed = draw(st.integers(1, 80)), draw(st.integers(1, 80)), draw(st.integers(0, 2**32 - 1))
        item.image = png(np.random.default_rng(seed).integers(0, 256, (h, w)))
        return CnnCase(item, decoded(item.image), True)
    if kind == "garbage":
        item.image = draw(st.one_of(st.binary(max_size=300), st.sampled_from([
            b"\x89PNG\r\n\x1a\n", b"BM", b"\xff\xd8\xff",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xff\xff\xff\xff\xff\xff\xff",
            b"BM" + b"\0" * 12 + b"\x28\0\0\0" + b"\xff\xff\xff\x7f" * 2 + b"\0" * 40])))
    elif kind == "truncated":
        full = png(np.random.default_rng(draw(st.integers(0, 1000))).integers(0, 256, (32, 32)))
        item.image = full[:draw(st.integers(1, len(full) - 1))]
        return CnnCase(item, decoded(full), False)
    elif kind == "tensor":
        t = pb.PixelTensor(shape=draw(st.one_of(st.sampled_from([[32, 32], [1, 32, 32]]), shapes)),
                           datatype=draw(st.sampled_from(["FP32", "UINT8", "FP64", "", "fp32"])))
        if draw(st.booleans()):
            t.fp32_contents.extend(draw(st.one_of(
                st.lists(st.floats(width=32), max_size=40),
                st.builds(lambda v, i, n: [128.0] * i + [v] + [128.0] * (n - i - 1),
                          st.one_of(st.sampled_from([*ODD_FLOATS, 255.5, 256.0]), st.floats(width=32)),
                          st.integers(0, 1022), st.sampled_from([1024, 1024, 1023, 1025])))))
        if draw(st.booleans()):
            t.raw_contents = draw(st.one_of(st.binary(max_size=64), st.sampled_from([b"\0" * 1024, b"\0" * 4096,
                                                                                     b"\0" * 1023, b"\0" * 4095])))
        item.tensor.CopyFrom(t)
        pixels = tensor_pixels(t)
        return CnnCase(item, pixels, pixels is not None)
    return CnnCase(item, None, False)


# -- sentiment.v1 --------------------------------------------------------------------------

unicode_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300)
texts = st.one_of(
    unicode_text, unicode_text,
    st.sampled_from(["", " ", "\t\n", "\u2003\u3000", "\x00", "\ufeff", "😀" * 50, "a" * 4096, "a" * 4097,
                     "é" * 5000, "great movie", "terrible, awful film"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["word ", "ü", "\u200b", "😀"]), st.integers(100, 6000)),
)
"""Texts: unicode garbage, empty or whitespace-only, just within and just over the 4096-character limit."""


def text_valid(text: str, max_chars: int = 4096) -> bool:
    """Whether the sentiment service must classify `text` (sentiment_service.model.text_problem, re-stated)."""
    return bool(text.strip()) and len(text) <= max_chars


@st.composite
def declared_shape_requests(draw: st.DrawFn, model: str, input_name: str) -> oip.ModelInferRequest:
    """One tensor whose declared shape is huge or zero-sized (or both) while its data is tiny or empty, of any
    datatype, as raw bytes or typed contents."""
    req = oip.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=input_name, datatype=draw(st.sampled_from([*OIP_DATATYPES, "BYTES", "BYTES", "FP32"])),
                       shape=draw(st.lists(st.sampled_from([0, 1, 2, 30, *HUGE_DIMS]), min_size=1, max_size=4)))
    if draw(st.booleans()):
        req.raw_input_contents.append(draw(st.one_of(st.just(b""), st.binary(max_size=16), st.just(b"\1\0\0\0a" * 3))))
    else:
        field = draw(st.sampled_from(sorted(CONTENTS_FIELDS)))
        getattr(t.contents, field).extend(draw(st.lists(CONTENTS_FIELDS[field], max_size=4)))
    return req


@st.composite
def text_tensor_requests(draw: st.DrawFn, model: str = "sentiment") -> tuple[oip.ModelInferRequest, list[bytes]]:
    """ModelInfer requests for a model with one BYTES input [N] (sentiment): texts of any kind, bytes that are
    not UTF-8, as typed contents or length-prefixed raw bytes (maybe cut or padded), declared shapes that fit
    the elements or not, other datatypes now and then. Returns the request and the elements sent."""
    elements = draw(st.lists(st.one_of(texts.map(str.encode), st.binary(max_size=40)), min_size=1, max_size=4))
    req = oip.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=draw(mostly(st.just("text"), st.sampled_from(["texts", "", "features"]), 90)),
                       datatype=draw(mostly(st.just("BYTES"), st.sampled_from([*OIP_DATATYPES, *JUNK_DATATYPES]), 85)),
                       shape=draw(mostly(st.just([len(elements)]), st.one_of(
                           st.sampled_from([[len(elements), 1], [len(elements) + 1], [], [0], [2**40]]), shapes), 80)))
    if draw(st.booleans()):
        raw = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
        cut = draw(mostly(st.just(0), st.integers(-6, 6), 80))
        req.raw_input_contents.append(raw[:cut] if cut < 0 else raw + b"\0" * cut)
    else:
        t.contents.bytes_contents.extend(elements)
    return req, elements


def text_tensor_valid(req: oip.ModelInferRequest, elements: list[bytes], max_batch: int = 32) -> bool:
    """Whether the sentiment service must classify a text_tensor_requests request."""
    t = req.inputs[0]
    if t.name != "text" or t.datatype != "BYTES" or list(t.shape) != [len(elements)] or len(elements) > max_batch:
        return False
    if req.raw_input_contents and len(req.raw_input_contents[0]) != sum(4 + len(e) for e in elements):
        return False
    try:
        return all(text_valid(e.decode("utf-8")) for e in elements)
    except UnicodeDecodeError:
        return False
