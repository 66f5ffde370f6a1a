"""The feature store failing never fails scoring: Redis killed under load, and a write-behind buffer that fills.

Real redis-server processes that the tests kill or pause; the fraud service is a real process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc

from fraud_service.materialize import materialize
from tests.support.metrics import scrape
from tests.support.procs import RedisServer, ServiceProcess

pytestmark = pytest.mark.integration

CARDS = 50


def card_tx(i: int, amount: float) -> pb.Transaction:
    return pb.Transaction(transaction_id=f"tx-{i}", card_id=f"card-{i % CARDS:06d}", amount=amount,
                          merchant_category="5411", channel=pb.CARD_PRESENT)


@pytest.fixture
def store() -> Iterator[RedisServer]:
    server = RedisServer().start()
    asyncio.run(materialize(server.url, CARDS, 42))
    yield server
    server.stop()


def start_service(model_repository: Path, store: RedisServer, **env: str) -> ServiceProcess:
    """The fraud service on `store`; feature reads bounded at 1 s unless `env` says otherwise (a busy machine can
    stall a read past the 20 ms default, and these tests need the reads before the failure to succeed)."""
    return ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository), "REDIS_URL": store.url,
        "FRAUD_FEATURE_TIMEOUT_MS": "1000", **env}).start()


def test_killing_redis_under_load_gives_flagged_defaults_never_an_error(model_repository, store):
    svc = start_service(model_repository, store, FRAUD_FEATURE_BREAKER_RESET_S="0.5",
                        FRAUD_BREAKER_RESET_S="0.5")
    sources: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    killed_at: list[float] = []

    def client(worker: int) -> None:
        with grpc.insecure_channel(svc.target) as channel:
            stub = rpc.FraudServiceStub(channel)
            i = 0
            while not stop.is_set():
                i += 1
                try:  # distinct amounts: no cache hits, every call reads the store
                    p = stub.Predict(pb.PredictRequest(transaction=card_tx(worker * 100_000 + i, 10.0 + i / 100)),
                                     timeout=5).prediction
                    sources.append((time.monotonic(), p.feature_source))
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    try:
        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        store.proc.kill()  # SIGKILL: connections reset, then refused
        store.proc.wait(5)
        killed_at.append(time.monotonic())
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors[:5]
        before = Counter(s for t, s in sources if t < killed_at[0])
        after = Counter(s for t, s in sources if t > killed_at[0] + 0.5)
        assert before["store"] > 20, before
        assert after["store_unavailable"] > 20 and after["store"] == 0, after
        metrics = scrape(svc.metrics_port)
        breaker = metrics[("inference_circuit_breaker_state", frozenset({("breaker", "features")}))]
        assert breaker in (1.0, 2.0)  # open or half-open: reads are not even attempted most of the time
        refused = metrics.get(("feature_store_reads_total", frozenset({("view", "fraud:card"),
                                                                       ("outcome", "breaker_open")})), 0)
        assert refused > 0
    finally:
        svc.stop()


def test_full_write_buffer_drops_and_counts_without_holding_latency(model_repository, store):
    svc = start_service(model_repository, store, FRAUD_WRITE_BUFFER_ITEMS="2", FRAUD_CACHE_ENABLED="false")
    client = redis.Redis.from_url(store.url)
    try:
        with grpc.insecure_channel(svc.target) as channel:
            stub = rpc.FraudServiceStub(channel)
            stub.Predict(pb.PredictRequest(transaction=card_tx(0, 5.0)), timeout=5)
            client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # reads go on, every write waits 3 s
            replies, took = [], []
            for i in range(1, 41):
                started = time.monotonic()
                replies.append(stub.Predict(pb.PredictRequest(transaction=card_tx(i, 5.0 + i)), timeout=5).prediction)
                took.append(time.monotonic() - started)
        assert all(r.feature_source == "store" for r in replies)
        # a call that waited for its writes would take the write timeout (1 s) or the pause (3 s)
        assert max(took) < 0.9, f"slowest call {max(took):.2f}s while writes were paused for 3 s"
        time.sleep(1.5)  # the write in flight since the first paused call passes its 1 s timeout
        client.execute_command("CLIENT", "UNPAUSE")

        def count(name: str) -> float:
            return scrape(svc.metrics_port).get((name, frozenset({("buffer", "fraud")})), 0.0)

        # a paused write times out after 1 s (failed, counted); meanwhile the 2-item buffer overflows (dropped)
        deadline = time.monotonic() + 10
        while sum(count(f"write_behind_{n}_total") for n in ("written", "failed", "dropped")) < 41:
            assert time.monotonic() < deadline, "not every prediction was written, failed or dropped"
            time.sleep(0.1)
        dropped, failed = count("write_behind_dropped_total"), count("write_behind_failed_total")
        assert dropped >= 10 and failed >= 1, (dropped, failed)
        assert sum(count(f"write_behind_{n}_total") for n in ("written", "failed", "dropped")) == 41
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()
        svc.stop()


def test_slow_store_is_cut_at_the_timeout_and_flagged(model_repository, store):
    svc = start_service(model_repository, store, FRAUD_FEATURE_TIMEOUT_MS="200", FRAUD_CACHE_ENABLED="false")
    client = redis.Redis.from_url(store.url)
    try:
        with grpc.insecure_channel(svc.target) as channel:
            stub = rpc.FraudServiceStub(channel)
            assert stub.Predict(pb.PredictRequest(transaction=card_tx(1, 5.0)), timeout=5).prediction.feature_source \
                == "store"
            client.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # Redis answers nothing for 3 s
            sources, took = [], []
            for i in range(2, 8):
                started = time.monotonic()
                sources.append(stub.Predict(pb.PredictRequest(transaction=card_tx(i, 7.0 + i)), timeout=5)
                               .prediction.feature_source)
                took.append(time.monotonic() - started)
        assert sources == ["store_unavailable"] * 6
        # cut at 200 ms (or refused by the open breaker); waiting for the paused store would take 3 s
        assert max(took) < 1.5, f"slowest call {max(took):.2f}s with the store paused for 3 s"
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()
        svc.stop()
