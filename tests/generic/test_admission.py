"""Overload a real service: the generic model service with a deliberately slow ONNX model (a deep stack of
matrix products, so its run time grows with the rows), offered far more than it can serve. Every request
must end at once as an answer or a fast RESOURCE_EXHAUSTED refusal with a `retry-after` trailer, never as
a client-side timeout; no admitted request waits in the queue past the model's latency budget."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration

WIDTH, DEPTH = 1024, 500
BUDGET_MS = 300.0


def build_slow_model(version_dir: Path) -> None:
    """x[N, WIDTH] -> DEPTH x tanh(x @ W) -> row sums y[N, 1]; W fixed by a seed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes, h = [], "x"
    for k in range(DEPTH):
        nodes += [helper.make_node("MatMul", [h, "W"], [f"m{k}"]), helper.make_node("Tanh", [f"m{k}"], [f"h{k}"])]
        h = f"h{k}"
    nodes.append(helper.make_node("ReduceSum", [h, "axes"], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version_dir.mkdir(parents=True)
    onnx.save(model, version_dir / "model.onnx")
    (version_dir / "config.json").write_text(json.dumps({
        "name": "slow", "version": 1, "platform": "onnxruntime_onnx", "artifact": "model.onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
        "batching": {"max_batch_size": 16, "max_queue_delay_ms": 2.0, "max_queue_size": 100_000,
                     "latency_budget_ms": BUDGET_MS},
        "runtime": {"intra_op_threads": 1, "inter_op_threads": 1},
        "warmup": {"batch_sizes": [1, 16], "iterations": 1},
    }))


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    repo = tmp_path_factory.mktemp("overload-repo")
    build_slow_model(repo / "slow" / "1")
    svc = ServiceProcess("generic_service", "GENERIC_", env={
        "GENERIC_MODEL_REPOSITORY": str(repo), "GENERIC_MODELS": "slow", "GENERIC_CACHE_ENABLED": "false"}).start()
    yield svc, repo
    svc.stop()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


async def offer(target: str, rows: np.ndarray, rate: float) -> list[tuple[str, float, dict[str, str]]]:
    """Send one OIP request per row at `rate` per second (open loop); (status, seconds, trailers) each."""
    # tritonclient's stubs of the same protocol: its descriptors and ours cannot share one process
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)

        async def one(row: np.ndarray) -> tuple[str, float, dict[str, str]]:
            req = pb.ModelInferRequest(model_name="slow")
            t = req.inputs.add(name="x", datatype="FP32", shape=[1, WIDTH])
            t.contents.fp32_contents.extend(row.tolist())
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(req, timeout=10.0)
            except grpc.aio.AioRpcError as e:
                return e.code().name, time.perf_counter() - t0, dict(e.trailing_metadata() or ())
            value = np.frombuffer(resp.raw_output_contents[0], np.float32)[0]
            return f"ok:{float(value)!r}", time.perf_counter() - t0, {}

        tasks, start = [], time.perf_counter()
        for i, row in enumerate(rows):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(row)))
        return await asyncio.gather(*tasks)


def test_overload_is_refused_fast_never_timed_out(slow_service: tuple[ServiceProcess, Path]) -> None:
    import onnxruntime as ort

    svc, repo = slow_service
    rows = np.random.default_rng(1).standard_normal((450, WIDTH)).astype(np.float32)
    expected = ort.InferenceSession(str(repo / "slow" / "1" / "model.onnx")).run(["y"], {"x": rows})[0][:, 0]
    before = scrape(svc.metrics_port)
    results = asyncio.run(offer(svc.target, rows, rate=300.0))
    after = scrape(svc.metrics_port)

    statuses = ["OK" if s.startswith("ok:") else s for s, _, _ in results]
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, sorted(set(statuses))  # no DEADLINE_EXCEEDED, no errors
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
    answered = [(i, r) for i, r in enumerate(results) if r[0].startswith("ok:")]
    assert len(refused) > 50 and len(answered) > 20, (len(refused), len(answered))
    for i, (status, _, _) in answered:  # every admitted request got its own row's right answer
        assert float(status[3:]) == pytest.approx(float(expected[i]), rel=1e-4, abs=1e-5)
    assert all(int(trailers["retry-after"]) >= 1 for _, _, trailers in refused)
    assert max(s for _, s, _ in refused) < 5.0  # nothing came near the client's 10 s timeout

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    labels = 'model="slow",version="1"'
    on_arrival = delta('inference_rejected_total{model="slow",reason="overload",version="1"}')
    after_queueing = delta('inference_rejected_total{model="slow",reason="over_budget",version="1"}')
    assert on_arrival + after_queueing == len(refused)
    assert after_queueing <= 0.1 * len(refused), (on_arrival, after_queueing)  # refused at once, not queued first
    waited = delta(f"inference_queue_wait_seconds_count{{{labels}}}")
    within_budget = delta(f'inference_queue_wait_seconds_bucket{{le="{BUDGET_MS / 1000}",{labels}}}')  # a bound
    assert waited >= len(answered) and within_budget == waited  # queue wait never above the budget


def test_model_config_shows_the_queue_policy(slow_service: tuple[ServiceProcess, Path]) -> None:
    # tritonclient's stubs of the same protocol: its descriptors and ours cannot share one process
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    svc, _ = slow_service
    with grpc.insecure_channel(svc.target) as channel:
        cfg = rpc.GRPCInferenceServiceStub(channel).ModelConfig(pb.ModelConfigRequest(name="slow"), timeout=5).config
    policy = cfg.dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == int(BUDGET_MS * 1000)
    assert policy.timeout_action == policy.REJECT and policy.max_queue_size == 100_000
