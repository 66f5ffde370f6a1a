"""Property tests of the Open Inference Protocol over real gRPC (the fraud service's `fraud` model): any
ModelInfer request -- random datatypes, shapes (negative, zero, huge with tiny data, wrong rank), contents that
disagree with the datatype, raw bytes of the wrong length, unknown models and versions, odd parameters --
gets OK with the reference answer when it is valid, else a documented client error naming what is wrong;
never INTERNAL, UNKNOWN or a hang. A valid request sent at the same time (same batch window) is answered
right, and ModelStreamInfer answers every message, a bad one with its own error.

Bounded by the Hypothesis profile (tests/fuzz/conftest.py): `ci` in `make test`, `long` in `make chaos`.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from tests.fraud.helpers import perturb
from tests.fuzz.strategies import (
    CLIENT_ERRORS,
    declared_shape_requests,
    fuzz_settings,
    names_a_field,
    oip_expectation,
    oip_requests,
    text_tensor_requests,
    text_tensor_valid,
)

pytestmark = pytest.mark.integration

MODEL, INPUT, OUTPUTS, MAX_BATCH = "fraud", "features", ("label", "probabilities"), 256
TIMEOUT_S = 30
_seeds = itertools.count(1000)


@pytest.fixture(scope="module")
def stub(fraud_channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(fraud_channel)


@pytest.fixture(scope="module")
def rows(fraud_rows) -> np.ndarray:
    """Valid rows (fresh data, nudged so the prediction cache has not seen them)."""
    return perturb(fraud_rows[0][:400], seed=77)


@pytest.fixture(scope="module")
def threshold(model_repository) -> float:
    import json

    return float(json.loads((model_repository / "fraud" / "1" / "config.json").read_text())["parameters"]["threshold"])


def _outputs(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    """A response's outputs by name (raw little-endian contents), checked for being well-formed."""
    assert len(response.raw_output_contents) == len(response.outputs)
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        arr = np.frombuffer(raw, dtypes[tensor.datatype])
        out[tensor.name] = arr.reshape(list(tensor.shape))
    return out


def check_answer(response: oip.ModelInferResponse, req: oip.ModelInferRequest, rows: np.ndarray, reference,
                 threshold: float) -> None:
    """An OK answer is the reference's, for the outputs asked for (all by default)."""
    assert response.model_name == MODEL and response.model_version == "1" and response.id == req.id
    wanted = [o.name for o in req.outputs] or list(OUTPUTS)
    out = _outputs(response)
    assert [t.name for t in response.outputs] == wanted
    expected = reference(rows)
    if "probabilities" in out:
        probs = out["probabilities"]
        assert probs.shape == (len(rows), 2)
        np.testing.assert_allclose(probs[:, 1], expected, atol=1e-6)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    if "label" in out:
        assert out["label"].shape == (len(rows),)
        assert out["label"].tolist() == [int(p >= threshold) for p in expected] or \
            np.abs(expected - threshold).min() < 1e-6  # a score on the threshold may round either way


def good_request(rows: np.ndarray) -> tuple[oip.ModelInferRequest, np.ndarray]:
    """A valid request of never-sent rows (a fresh nudge each time: the cache cannot answer it)."""
    i = next(_seeds)
    data = perturb(rows[i % len(rows):i % len(rows) + 2], seed=i)
    req = oip.ModelInferRequest(model_name=MODEL, id=f"good-{i}")
    req.inputs.add(name=INPUT, datatype="FP32", shape=list(data.shape))
    req.raw_input_contents.append(data.astype("<f4").tobytes())
    return req, data


def call(stub, req: oip.ModelInferRequest) -> tuple[grpc.StatusCode, str, oip.ModelInferResponse | None]:
    try:
        return grpc.StatusCode.OK, "", stub.ModelInfer(req, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


def call_valid(stub, req: oip.ModelInferRequest) -> oip.ModelInferResponse:
    """A valid request must be answered; admission control may refuse it on a busy machine: retry then."""
    for _ in range(5):
        code, message, response = call(stub, req)
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            break
    assert code == grpc.StatusCode.OK, (code, message)
    return response


def check_refusal(code: grpc.StatusCode, message: str, expected: grpc.StatusCode, req) -> None:
    assert code in CLIENT_ERRORS, f"{code}: {message}"
    assert message.strip(), "an error must say why"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # admission control on a busy machine
        return
    assert code == expected, f"expected {expected}, got {code}: {message}"
    assert names_a_field(message, req), f"the message does not say what is wrong: {message!r}"


@fuzz_settings(150)
@given(data=st.data())
def test_model_infer_answers_or_refuses_clearly(stub, rows, fraud_bounds, onnx_reference, threshold, data):
    req = data.draw(oip_requests(MODEL, INPUT, rows, OUTPUTS), label="request")
    expect = oip_expectation(req, MODEL, INPUT, fraud_bounds, OUTPUTS, MAX_BATCH)
    note(f"expected: {expect.code}")
    good, good_rows = good_request(rows)
    bad_future = stub.ModelInfer.future(req, timeout=TIMEOUT_S)  # the same batch window as the valid request
    good_future = stub.ModelInfer.future(good, timeout=TIMEOUT_S)
    try:
        response, code, message = bad_future.result(), grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        response, code, message = None, err.code(), err.details() or ""
    note(f"got: {code} {message!r}")
    event(f"expected {expect.code.name}, got {code.name}")
    if any(d >= 2**31 for t in req.inputs for d in t.shape):
        event("a huge declared shape")
    if expect.code == grpc.StatusCode.OK:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            response = call_valid(stub, req)
        else:
            assert code == grpc.StatusCode.OK, f"a valid request was refused: {code}: {message}"
        check_answer(response, req, expect.rows, onnx_reference, threshold)
    else:
        assert code != grpc.StatusCode.OK, "an invalid request was answered"
        check_refusal(code, message, expect.code, req)
    try:
        good_response = good_future.result()
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{err.code()}: {err.details()}"
        good_response = call_valid(stub, good)
    check_answer(good_response, good, good_rows, onnx_reference, threshold)


@fuzz_settings(60)
@given(req=declared_shape_requests(MODEL, INPUT))
def test_declared_shapes_never_exhaust_the_server(stub, rows, onnx_reference, threshold, req):
    """A huge (or zero-sized) declared shape with tiny data is refused as INVALID_ARGUMENT naming the input, before
    the server allocates for it; a valid request alongside is answered right."""
    good, good_rows = good_request(rows)
    good_future = stub.ModelInfer.future(good, timeout=TIMEOUT_S)
    code, message, _ = call(stub, req)
    note(f"got: {code} {message!r}")
    check_refusal(code, message, grpc.StatusCode.INVALID_ARGUMENT, req)
    try:
        good_response = good_future.result()
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{err.code()}: {err.details()}"
        good_response = call_valid(stub, good)
    check_answer(good_response, good, good_rows, onnx_reference, threshold)


@fuzz_settings(20)
@given(data=st.data())
def test_model_stream_infer_answers_every_message(stub, rows, fraud_bounds, onnx_reference, threshold, data):
    """A stream of good and bad messages: one answer per message, in order; a bad one gets its own error
    message (Triton's `error_message`, led by the status name) and the good ones their reference answers."""
    messages = data.draw(st.lists(st.one_of(oip_requests(MODEL, INPUT, rows, OUTPUTS),
                                            st.builds(lambda _: good_request(rows)[0], st.none())),
                                  min_size=1, max_size=8), label="stream")
    for i, m in enumerate(messages):
        m.id = f"m{i}"
    responses = list(stub.ModelStreamInfer(iter(messages), timeout=TIMEOUT_S))
    assert [r.infer_response.id for r in responses] == [m.id for m in messages]
    for m, r in zip(messages, responses, strict=True):
        expect = oip_expectation(m, MODEL, INPUT, fraud_bounds, OUTPUTS, MAX_BATCH)
        note(f"{m.id}: expected {expect.code}, got {r.error_message!r}")
        if r.error_message:
            code_name, _, message = r.error_message.partition(": ")
            code = grpc.StatusCode[code_name]
            if expect.code == grpc.StatusCode.OK:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, r.error_message
                continue
            check_refusal(code, message, expect.code, m)
        else:
            assert expect.code == grpc.StatusCode.OK, f"{m.id}: an invalid message was answered"
            check_answer(r.infer_response, m, expect.rows, onnx_reference, threshold)


def test_still_serving_afterwards(stub, rows, onnx_reference, threshold):
    """After every malformed request above, the server is live, ready, and answers right."""
    assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=MODEL), timeout=10).ready
    good, good_rows = good_request(rows)
    check_answer(call_valid(stub, good), good, good_rows, onnx_reference, threshold)


@pytest.mark.parametrize(("datatype", "shape", "raw", "message"), [
    # Regressions the property test found: UNKNOWN (numpy's MemoryError / ValueError) before the fix.
    ("BYTES", [2**40], b"\1\0\0\0a", "input 'features': shape [1099511627776] declares 1099511627776 BYTES "
                                     "elements, 5 raw bytes hold at most 1 (4-byte length each)"),
    ("BYTES", [10**8], b"\1\0\0\0a", "input 'features': shape [100000000] declares 100000000 BYTES elements, "
                                     "5 raw bytes hold at most 1 (4-byte length each)"),
    ("BYTES", [2**62, 4], b"", f"input 'features': shape [{2**62}, 4] is too large"),
    ("FP32", [0, 2**62], b"", f"input 'features': shape [0, {2**62}] is too large"),
    ("INT8", [2**63 - 1, 0, 2**63 - 1], b"", f"input 'features': shape [{2**63 - 1}, 0, {2**63 - 1}] is too large"),
])
def test_huge_declared_shapes_are_refused_before_allocating(stub, datatype, shape, raw, message):
    req = oip.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name=INPUT, datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    code, got, _ = call(stub, req)
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, message)


@pytest.fixture(scope="module")
def sentiment_oip(sentiment_channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(sentiment_channel)


@fuzz_settings(25)
@given(case=text_tensor_requests())
def test_bytes_tensors_of_texts(sentiment_oip, sentiment_channel, case):
    """The sentiment model over OIP: texts as BYTES (contents or raw, maybe cut, maybe not UTF-8) are classified
    as the typed API classifies them when valid, else refused naming the input or the row."""
    from sentiment.v1 import sentiment_pb2, sentiment_pb2_grpc

    req, elements = case
    valid = text_tensor_valid(req, elements)
    code, message, response = call(sentiment_oip, req)
    note(f"valid: {valid}, got {code}: {message!r}")
    event(f"valid {valid}, got {code.name}")
    if not valid:
        assert code != grpc.StatusCode.OK, "an invalid request was answered"
        check_refusal(code, message, grpc.StatusCode.INVALID_ARGUMENT, req)
        return
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        response = call_valid(sentiment_oip, req)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, message)
    dtypes = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?", "INT32": "<i4"}
    out = {t.name: np.frombuffer(raw, dtypes[t.datatype]).reshape(list(t.shape))
           for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
    n = len(elements)
    assert out["probabilities"].shape == (n, 2) and out["label"].shape == (n,)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert out["label"].tolist() == out["probabilities"].argmax(axis=1).tolist()
    typed = sentiment_pb2_grpc.SentimentServiceStub(sentiment_channel).PredictBatch(
        sentiment_pb2.PredictBatchRequest(texts=[e.decode() for e in elements]), timeout=TIMEOUT_S).results
    for i, result in enumerate(typed):
        if result.WhichOneof("outcome") == "error":  # a busy machine's refusal
            assert result.error.code == "RESOURCE_EXHAUSTED", result.error
            continue
        np.testing.assert_allclose(out["probabilities"][i], [p.probability for p in result.prediction.probabilities],
                                   atol=1e-5)
        assert int(out["tokens"][i]) == result.prediction.tokens
        assert bool(out["truncated"][i]) == result.prediction.truncated


def test_a_message_over_the_size_limit_is_resource_exhausted(stub, rows, onnx_reference, threshold):
    """A request over the server's message limit (16 MiB by default) is RESOURCE_EXHAUSTED, saying so, and the
    server answers the next one."""
    n = (17 << 20) // (30 * 4) + 1
    req = oip.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name=INPUT, datatype="FP32", shape=[n, 30])
    req.raw_input_contents.append(bytes(n * 30 * 4))
    code, message, _ = call(stub, req)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message, (code, message)
    good, good_rows = good_request(rows)
    check_answer(call_valid(stub, good), good, good_rows, onnx_reference, threshold)


model_names = st.one_of(st.just(MODEL), st.sampled_from(["cnn", "sentiment", "Fraud", "", "fraud/1", "../fraud"]),
                        st.text(max_size=30))


@fuzz_settings(40)
@given(name=model_names, version=st.one_of(st.sampled_from(["", "0", "1", "2", "-1", "01"]), st.text(max_size=10)))
def test_metadata_rpcs_of_unknown_models_and_versions(stub, name, version):
    """ModelMetadata, ModelConfig and ModelReady: the served model and version are described; anything else is
    NOT_FOUND naming the model or the version (ModelReady: not ready for an unknown version of a known model)."""
    served = name == MODEL and version in ("", "0", "1")
    for rpc, req in ((stub.ModelMetadata, oip.ModelMetadataRequest(name=name, version=version)),
                     (stub.ModelConfig, oip.ModelConfigRequest(name=name, version=version))):
        try:
            response = rpc(req, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            assert not served, f"{err.code()}: {err.details()}"
            assert err.code() == grpc.StatusCode.NOT_FOUND, f"{err.code()}: {err.details()}"
            assert repr(name) in err.details() or repr(version) in err.details(), err.details()
            continue
        assert served
        assert (response.name if hasattr(response, "platform") else response.config.name) == MODEL
    try:
        ready = stub.ModelReady(oip.ModelReadyRequest(name=name, version=version), timeout=TIMEOUT_S).ready
    except grpc.RpcError as err:
        assert name != MODEL and err.code() == grpc.StatusCode.NOT_FOUND, f"{err.code()}: {err.details()}"
        return
    assert ready == served
