"""The load generator's pure logic: the arrival schedule, repeat workloads, latency from the intended time."""

from __future__ import annotations

import numpy as np
import pytest

from bench import loadgen
from bench.loadgen import Payloads, Phase
from bench.report import usd_per_1000
from bench.stack import keys_for, observed


def test_arrivals_follow_a_piecewise_constant_rate() -> None:
    t = loadgen.arrivals([Phase(2, 10), Phase(1, 100), Phase(2, 10)])
    assert len(t) == 20 + 100 + 20
    assert np.all(np.diff(t) > 0)
    assert np.allclose(np.diff(t[:20]), 0.1)
    assert np.allclose(np.diff(t[21:119]), 0.01)
    assert 2.0 <= t[20] < 2.01 and t[-1] < 5.0


def test_input_sequence_repeats_the_asked_fraction() -> None:
    seq = loadgen.input_sequence(Payloads("fraud", repeat_fraction=0.3, seed=1), "fraud", 2000)
    distinct = {tuple(x) for x in seq}
    assert len(seq) == 2000
    assert 0.25 < 1 - len(distinct) / len(seq) < 0.35
    assert len({tuple(x) for x in loadgen.input_sequence(Payloads("fraud"), "fraud", 500)}) == 500


def test_enough_keys_for_the_gateway_rate_limit() -> None:
    assert keys_for(1000, 60) >= 600  # 100 req/min per key
    assert keys_for(1000, 30) * 100 >= 1000 * 30
    assert keys_for(5, 2) == 1


def test_observed_diffs_service_histograms() -> None:
    before = {"fraud": {'inference_batch_size_count{model="fraud",version="1"}': 10.0,
                        'inference_batch_size_sum{model="fraud",version="1"}': 10.0,
                        'inference_batch_size_bucket{le="1.0",model="fraud",version="1"}': 10.0,
                        'inference_batch_size_bucket{le="+Inf",model="fraud",version="1"}': 10.0}}
    after = {"fraud": {'inference_batch_size_count{model="fraud",version="1"}': 14.0,
                       'inference_batch_size_sum{model="fraud",version="1"}': 22.0,
                       'inference_batch_size_bucket{le="1.0",model="fraud",version="1"}': 12.0,
                       'inference_batch_size_bucket{le="+Inf",model="fraud",version="1"}': 14.0,
                       'inference_cache_total{model="fraud",result="hit"}': 3.0,
                       'inference_cache_total{model="fraud",result="miss"}': 9.0}}
    o = observed(before, after, "fraud")
    assert o["batches"] == 4 and o["rows"] == 12 and o["mean_batch"] == 3.0
    assert o["batch_hist_le"] == {"1.0": 2.0, "+Inf": 2.0}
    assert o["cache_hit_rate"] == 0.25


def test_cost_per_1000_predictions() -> None:
    # 1 ms of one core per prediction at $0.036 per core-hour: 1 core-second per 1000 = $0.00001.
    assert usd_per_1000(0.001, 0.036) == pytest.approx(1e-5)
    assert usd_per_1000(0.002, 0.036) == pytest.approx(2 * usd_per_1000(0.001, 0.036))
    assert usd_per_1000(0.001, 0.072) == pytest.approx(2e-5)


@pytest.mark.parametrize("kind", ["grpc", "oip"])
def test_open_loop_run_against_the_fraud_service(fraud_service, kind: str) -> None:
    """Typed gRPC and the Open Inference Protocol, from two worker processes, on schedule."""
    from bench.loadgen import Target

    r = loadgen.run([Target("fraud", kind, fraud_service.target)], [Phase(1.0, 20)], processes=2)
    s = r.summary()
    assert r.errors == [] and s["requests"] == 20 and s["ok"] == 20, s
    assert np.all(r.start >= r.intended - 0.005)  # never sent early
    assert np.all(r.latency > 0) and 0 < s["p50_ms"] <= s["max_ms"]
    assert s["achieved_rps"] == pytest.approx(20.0, rel=0.05)  # by completion window: ends at the last answer
    assert r.generator_cpu_s > 0


def test_rest_client_reads_lengths_chunks_limits_and_times_out() -> None:
    """The generator's minimal HTTP/1.1 client against canned answers: Content-Length and chunked bodies on one
    keep-alive connection, the gateway's rate limit told apart from a server's 429, 503, a silent server."""
    import asyncio

    from bench.loadgen import RATE_LIMITED, TIMEOUT, RestSender, Target

    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nx-ratelimit-remaining: 0\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
        None,  # never answers
    ]
    seen: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen.append(head + await reader.readexactly(length))
            answer = answers[len(seen) - 1]
            if answer is None:
                await asyncio.sleep(5)
                return
            writer.write(answer)
            await writer.drain()

    async def main() -> list[str]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sender = RestSender(Target("fraud", "rest", f"127.0.0.1:{port}", ("tok",)), [[1.0, 2.0]], timeout_s=0.3)
        await sender.open()
        out = [await sender.send() for _ in answers]
        await sender.close()
        server.close()
        return out

    assert asyncio.run(main()) == ["ok", "ok", RATE_LIMITED, "http_429", "http_503", TIMEOUT]
    assert connections == 1  # one keep-alive connection for every answered request
    assert seen[0].startswith(b"POST /api/v1/fraud HTTP/1.1\r\n") and b"Authorization: Bearer tok\r\n" in seen[0]
    assert seen[0].endswith(b'\r\n\r\n{"transaction": {"features": [1.0, 2.0]}}')
