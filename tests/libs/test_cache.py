"""mlplatform.cache: row keys, the output codec, the in-process LRU, and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from mlplatform.breaker import Breaker
from mlplatform.cache import LRUCache, RedisCache, decode_outputs, encode_outputs, record_lookups, row_key
from tests.support.procs import RedisServer

_names = itertools.count()


def breaker(fail_max: int = 3, reset_timeout_s: float = 0.5) -> Breaker:
    return Breaker(f"test-cache-{next(_names)}", fail_max=fail_max, reset_timeout_s=reset_timeout_s)


# -- row_key -----------------------------------------------------------------------------------

ROW = {"features": np.array([1.5, -2.0, 3.25], dtype=np.float32), "ids": np.array([7, 8], dtype=np.int64)}


def test_row_key_names_model_and_version():
    key = row_key("fraud", "3", ROW)
    prefix, model, version, digest = key.split(":")
    assert (prefix, model, version) == ("pred", "fraud", "3")
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert row_key("fraud", 3, ROW) == key  # int and str versions are the same version


def test_row_key_of_bytes_hashes_the_text_not_the_object():
    def text(value: bytes) -> dict[str, np.ndarray]:
        arr = np.empty(1, dtype=object)
        arr[0] = value
        return {"text": arr[0:1].reshape(())}

    same = row_key("sentiment", 1, text(b"great " + b"film")), row_key("sentiment", 1, text(b"great film"))
    assert same[0] == same[1]  # equal texts in different objects
    assert row_key("sentiment", 1, text(b"great film")) != row_key("sentiment", 1, text(b"awful film"))
    # Element boundaries count: ["ab", "c"] is not ["a", "bc"].
    two = np.empty(2, dtype=object)
    two[:] = [b"ab", b"c"]
    other = np.empty(2, dtype=object)
    other[:] = [b"a", b"bc"]
    assert row_key("m", 1, {"t": two}) != row_key("m", 1, {"t": other})


def test_row_key_differs_across_versions_and_models():
    keys = {row_key("fraud", 1, ROW), row_key("fraud", 2, ROW), row_key("churn", 1, ROW)}
    assert len(keys) == 3


def test_row_key_is_deterministic():
    copy = {name: arr.copy() for name, arr in reversed(list(ROW.items()))}  # other dict order, other buffers
    assert row_key("m", 1, ROW) == row_key("m", 1, copy)
    # a non-contiguous view with the same values hashes like a contiguous array
    strided = np.array([1.5, 0, -2.0, 0, 3.25, 0], dtype=np.float32)[::2]
    assert not strided.flags.c_contiguous
    assert row_key("m", 1, {**ROW, "features": strided}) == row_key("m", 1, ROW)


def test_row_key_treats_negative_zero_as_zero():
    pos = {"x": np.array([0.0, 1.0], dtype=np.float32)}
    neg = {"x": np.array([-0.0, 1.0], dtype=np.float32)}
    assert np.signbit(neg["x"][0])
    assert row_key("m", 1, pos) == row_key("m", 1, neg)
    assert row_key("m", 1, {"x": np.array(-0.0)}) == row_key("m", 1, {"x": np.array(0.0)})
    assert np.signbit(neg["x"][0]), "hashing must not modify the caller's array"


@pytest.mark.parametrize(
    "other",
    [
        {"features": np.array([1.5, -2.0, 3.5], dtype=np.float32)},  # another value
        {"features": np.array([1.5, -2.0, 3.25], dtype=np.float64)},  # another dtype
        {"features": np.array([1.5, -2.0, 3.25, 0.0], dtype=np.float32)},  # another length
    ],
    ids=["value", "dtype", "length"],
)
def test_row_key_differs_for_different_inputs(other):
    assert row_key("m", 1, {**ROW, **other}) != row_key("m", 1, ROW)


def test_row_key_differs_for_different_shapes_of_the_same_bytes():
    flat = np.arange(6, dtype=np.int32)
    keys = {row_key("m", 1, {"x": flat.reshape(shape)}) for shape in [(6,), (2, 3), (3, 2), (1, 6)]}
    assert len(keys) == 4


def test_row_key_differs_for_different_input_names():
    x = np.ones(3, dtype=np.float32)
    assert row_key("m", 1, {"a": x}) != row_key("m", 1, {"b": x})


# -- encode / decode ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arr",
    [
        np.array(0.25, dtype=np.float32),
        np.array([1, 0, 1], dtype=np.int64),
        np.arange(12, dtype=np.float64).reshape(3, 4) / 7,
        np.array([[True, False]], dtype=np.bool_),
        np.array([-128, 0, 127], dtype=np.int8),
        np.array([65535, 1], dtype=np.uint16),
        np.array([1.5, -0.0, np.inf], dtype=np.float16),
        np.array([1, 2, 3], dtype=">i4"),  # big-endian survives as such
        np.zeros((0, 3), dtype=np.float32),
        np.zeros((2, 0, 3), dtype=np.int32),
        np.arange(24, dtype=np.int16).reshape(2, 3, 4).transpose(2, 0, 1),  # non-contiguous
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    ],
    ids=lambda a: f"{a.dtype.str}{list(a.shape)}",
)
def test_encode_decode_round_trip(arr):
    out = decode_outputs(encode_outputs({"y": arr}))
    assert list(out) == ["y"]
    assert out["y"].dtype == arr.dtype
    assert out["y"].shape == arr.shape
    np.testing.assert_array_equal(out["y"], arr)


def test_encode_decode_several_outputs_keep_names_and_order():
    outputs = {
        "label": np.int64(1),
        "probabilities": np.array([0.25, 0.75], dtype=np.float32),
        "scöre": np.array([[1.0, 2.0], [3.0, 4.0]]),
    }
    data = encode_outputs(outputs)
    assert isinstance(data, bytes)
    out = decode_outputs(data)
    assert list(out) == list(outputs)
    for name, arr in outputs.items():
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].dtype == np.asarray(arr).dtype
        assert out[name].shape == np.shape(arr)


def test_encoding_is_deterministic_and_compact():
    outputs = {"y": np.arange(4, dtype=np.float32)}
    assert encode_outputs(outputs) == encode_outputs({"y": np.arange(4, dtype=np.float32)})
    (n,) = struct.unpack_from("<I", encode_outputs(outputs))
    assert len(encode_outputs(outputs)) == 4 + n + 16


def _blob(header, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + body


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00",
        struct.pack("<I", 3) + b"{x]",
        struct.pack("<I", 2) + b"\xff\xfe",
        struct.pack("<I", 100) + b"[]",
        _blob(5),
        _blob({"abc": 1}),
        _blob([["y", "<f4"]]),
        _blob([["y", "bogus", [1]]], b"\0" * 4),
        _blob([["y", "|O", [1]]], b"\0" * 8),
        _blob([["y", "<f8", [4]]], b"\0" * 16),  # truncated body
        _blob([["y", "<f8", [1]]], b"\0" * 9),  # trailing bytes
        _blob([["y", "|u1", "ab"]], b"\0\0"),
        _blob([["y", "|u1", None]], b"\0"),
        _blob([["y", "|u1", [1.5]]], b"\0"),
        _blob([[["y"], "|u1", [1]]], b"\0"),
        _blob([["y", "|V0", [3]]]),
        # a negative dimension makes numpy read "all the rest", so a crafted entry could alias the header
        _blob([["a", "|u1", [-1]], ["b", "|u1", [5]]], b"\x01\x02\x03\x04"),
        _blob([["a", "|u1", [2, -1]]], b"\0" * 4),
        _blob([["y", "<f8", [2**62, 2**62]]], b"\0" * 8),
    ],
)
def test_decode_rejects_malformed_data(data):
    with pytest.raises(ValueError):
        decode_outputs(data)


def test_decode_rejects_a_corrupted_real_entry():
    good = encode_outputs({"y": np.arange(3, dtype=np.float64)})
    with pytest.raises(ValueError):
        decode_outputs(good[:-1])
    with pytest.raises(ValueError):
        decode_outputs(good + b"\0")


# -- LRUCache ----------------------------------------------------------------------------------

async def test_lru_get_set_and_misses():
    cache = LRUCache(max_entries=10, ttl_s=60)
    assert cache.backend == "memory"
    await cache.set_many({"a": b"1", "b": b"2"})
    assert await cache.get_many(["a", "x", "b"]) == [b"1", None, b"2"]
    await cache.set_many({"a": b"3"})
    assert await cache.get_many(["a"]) == [b"3"]
    assert len(cache) == 2
    await cache.close()
    assert len(cache) == 0
    assert await cache.get_many(["a", "b"]) == [None, None]


async def test_lru_entries_expire_after_ttl():
    cache = LRUCache(max_entries=10, ttl_s=0.1)
    await cache.set_many({"old": b"1"})
    assert await cache.get_many(["old"]) == [b"1"]
    await asyncio.sleep(0.15)
    await cache.set_many({"new": b"2"})
    assert await cache.get_many(["old", "new"]) == [None, b"2"]
    assert len(cache) == 1  # the expired entry was dropped on read


async def test_lru_evicts_least_recently_used():
    cache = LRUCache(max_entries=3, ttl_s=60)
    await cache.set_many({"a": b"a", "b": b"b", "c": b"c"})
    assert await cache.get_many(["a"]) == [b"a"]  # a is now the most recently used
    await cache.set_many({"d": b"d"})  # evicts b, the least recently used
    assert await cache.get_many(["b"]) == [None]
    await cache.set_many({"c": b"c2"})  # re-setting refreshes c
    await cache.set_many({"e": b"e", "f": b"f"})  # evicts a, then d
    assert len(cache) == 3
    assert await cache.get_many(["a", "b", "c", "d", "e", "f"]) == [None, None, b"c2", None, b"e", b"f"]


async def test_lru_keeps_at_most_max_entries_from_one_batch():
    cache = LRUCache(max_entries=4, ttl_s=60)
    await cache.set_many({str(i): bytes([i]) for i in range(10)})
    assert len(cache) == 4
    assert await cache.get_many(["5", "6", "7", "8", "9"]) == [None, b"\x06", b"\x07", b"\x08", b"\x09"]


def test_record_lookups_counts_hits_and_misses():
    labels = {"model": "record-lookups-test"}

    def value(result: str) -> float:
        return REGISTRY.get_sample_value("inference_cache_total", {**labels, "result": result}) or 0.0

    record_lookups(labels["model"], hits=3, misses=2)
    record_lookups(labels["model"], hits=0, misses=4)
    assert (value("hit"), value("miss")) == (3, 6)


# -- RedisCache (real redis-server) ------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """This module's own redis-server (the outage test stops and restarts its own)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def redis_cache(redis_server):
    # a generous socket timeout: these tests are about behaviour, not about a loaded machine's latency
    cache = RedisCache(redis_server.url, ttl_s=120, timeout_s=1.0, breaker=breaker())
    yield cache
    await cache.close()


async def test_redis_set_many_get_many_round_trip(redis_cache):
    assert redis_cache.backend == "redis"
    assert await redis_cache.ping()
    outputs = {f"pred:test:1:{i}": encode_outputs({"y": np.array([i, i * 0.5])}) for i in range(5)}
    await redis_cache.set_many(outputs)

    keys = ["pred:test:1:0", "pred:test:1:absent", "pred:test:1:4", "pred:test:1:2"]
    got = await redis_cache.get_many(keys)
    assert got[1] is None
    assert got[0] == outputs["pred:test:1:0"]
    np.testing.assert_array_equal(decode_outputs(got[2])["y"], [4, 2.0])
    np.testing.assert_array_equal(decode_outputs(got[3])["y"], [2, 1.0])
    assert redis_cache.breaker.state == "closed"


async def test_redis_entries_get_the_ttl(redis_server, redis_cache):
    await redis_cache.set_many({"pred:ttl:1:a": b"x", "pred:ttl:1:b": b"y"})
    raw = redis.Redis.from_url(redis_server.url)
    try:
        for key in ("pred:ttl:1:a", "pred:ttl:1:b"):
            assert 110 <= raw.ttl(key) <= 120
        assert raw.get("pred:ttl:1:a") == b"x"
    finally:
        raw.close()


async def test_redis_empty_lookups_are_not_failures(redis_server):
    cache = RedisCache(redis_server.url, ttl_s=60, timeout_s=1.0, breaker=breaker(fail_max=1))
    try:
        for _ in range(3):
            assert await cache.get_many([]) == []
            await cache.set_many({})
        assert cache.breaker.state == "closed"
        await cache.set_many({"pred:empty:1:k": b"v"})
        assert await cache.get_many(["pred:empty:1:k"]) == [b"v"]
    finally:
        await cache.close()


async def round_trip_eventually(cache: RedisCache, key: str, value: bytes, within: float = 10.0) -> None:
    """Set and read back `key` until it works (a 50 ms timeout can be missed on a loaded machine)."""
    deadline = time.monotonic() + within
    got: list[bytes | None] = [None]
    while time.monotonic() < deadline:
        await cache.set_many({key: value})
        got = await cache.get_many([key])
        if got == [value] and cache.breaker.state == "closed":
            return
        await asyncio.sleep(0.6)  # a failed trial re-opens the breaker for reset_timeout_s
    raise AssertionError(f"redis cache did not work within {within}s: got {got}, breaker {cache.breaker.state}")


async def test_redis_down_reads_as_misses_then_opens_breaker_and_recovers(monkeypatch):
    server = RedisServer().start()
    restarted: RedisServer | None = None
    brk = breaker(fail_max=3, reset_timeout_s=0.5)
    state_gauge = {"breaker": brk.name}
    cache = RedisCache(server.url, ttl_s=60, timeout_s=0.05, breaker=brk)
    try:
        await round_trip_eventually(cache, "pred:outage:1:k", b"before")

        server.stop()
        assert await cache.get_many(["pred:outage:1:k", "pred:outage:1:j"]) == [None, None]
        assert brk.state == "closed"
        await cache.set_many({"pred:outage:1:k": b"during"})  # does not raise
        assert brk.state == "closed"
        assert await cache.get_many(["pred:outage:1:k"]) == [None]
        assert brk.state == "open"  # 3 consecutive failures
        assert REGISTRY.get_sample_value("inference_circuit_breaker_state", state_gauge) == 2

        # open: calls are answered as misses without reaching the client
        client_calls = []
        monkeypatch.setattr(cache._client, "mget", lambda *a, **k: client_calls.append("mget"))
        monkeypatch.setattr(cache._client, "pipeline", lambda *a, **k: client_calls.append("pipeline"))
        for _ in range(10):
            assert await cache.get_many(["pred:outage:1:k"]) == [None]
            await cache.set_many({"pred:outage:1:k": b"open"})
        assert client_calls == []
        assert brk.state == "open"
        monkeypatch.undo()

        restarted = RedisServer(port=server.port).start()
        await asyncio.sleep(0.6)  # reset_timeout_s
        await round_trip_eventually(cache, "pred:outage:1:k", b"after")  # data is gone; new writes work
        assert brk.state == "closed"
        assert REGISTRY.get_sample_value("inference_circuit_breaker_state", state_gauge) == 0
        assert await cache.ping()
    finally:
        await cache.close()
        server.stop()
        if restarted is not None:
            restarted.stop()
