"""Prediction cache: per-row keys, Redis (redis.asyncio) or an in-process LRU.

A key holds the model name, its version and a canonical hash of the row's
inputs, so a new model version never sees an older version's answers. Values
are the row's outputs in a small self-describing binary format (never pickle:
the cache is not trusted to hold code). The Redis cache sits behind a circuit
breaker with short timeouts: Redis slow or down means the cache is bypassed,
predictions still succeed, and the breaker state is a metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from mlplatform import metrics
from mlplatform.breaker import Breaker, BreakerOpenError

log = logging.getLogger(__name__)

KEY_PREFIX = "pred"


def row_key(model: str, version: str | int, row: Mapping[str, np.ndarray]) -> str:
    """Cache key of one row: `pred:<model>:<version>:<sha256>` over every input's dtype, shape and bytes.

    Inputs are hashed in name order; -0.0 is folded into 0.0 so equal values hash equally.
    """
    h = hashlib.sha256()
    for name in sorted(row):
        arr = np.ascontiguousarray(row[name])
        if arr.dtype.kind == "f":
            arr = arr + arr.dtype.type(0)  # -0.0 -> 0.0
        h.update(name.encode())
        h.update(arr.dtype.str.encode())
        h.update(repr(arr.shape).encode())
        if arr.dtype == object:  # BYTES: hash the elements, not the object pointers
            for value in arr.reshape(-1):
                data = value if isinstance(value, bytes) else str(value).encode()
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        else:
            h.update(arr.tobytes())
    return f"{KEY_PREFIX}:{model}:{version}:{h.hexdigest()}"


def identity_key(model: str, version: str | int, identity: str) -> str:
    """Cache key of a row known by a caller-defined identity (e.g. `card:<id>:<transaction hash>`):
    `pred:<model>:<version>:id:<identity>`, so it never collides with a tensor hash."""
    return f"{KEY_PREFIX}:{model}:{version}:id:{identity}"


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays: a JSON header (names, dtypes, shapes) then the raw bytes."""
    header = [(name, arr.dtype.str, list(arr.shape)) for name, arr in outputs.items()]
    head = json.dumps(header).encode()
    body = b"".join(np.ascontiguousarray(arr).tobytes() for arr in outputs.values())
    return struct.pack("<I", len(head)) + head + body


def decode_outputs(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_outputs`; raises ValueError on malformed data."""
    try:
        (n,) = struct.unpack_from("<I", data)
        header = json.loads(data[4:4 + n])
        offset = 4 + n
        out: dict[str, np.ndarray] = {}
        for name, dtype_str, shape in header:
            dtype = np.dtype(dtype_str)
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"bad shape {shape!r}")
            if dtype.hasobject:
                raise ValueError("object arrays are not cacheable")
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
            offset += size
        if offset != len(data):
            raise ValueError("trailing bytes")
        return out
    except (struct.error, json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"malformed cache entry: {exc}") from exc


class PredictionCache(Protocol):
    """Stores encoded per-row outputs by key."""

    backend: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes]) -> None: ...

    async def close(self) -> None: ...


class LRUCache:
    """In-process LRU with TTL: the embedded default when no Redis is configured."""

    backend = "memory"

    def __init__(self, max_entries: int = 100_000, ttl_s: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._data.get(key)
            if entry is None or entry[0] < now:
                if entry is not None:
                    del self._data[key]
                out.append(None)
            else:
                self._data.move_to_end(key)
                out.append(entry[1])
        return out

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        expires = time.monotonic() + self.ttl_s
        for key, value in items.items():
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis-backed cache (redis.asyncio) behind a circuit breaker; failures read as misses."""

    backend = "redis"

    def __init__(self, url: str, *, ttl_s: int = 3600, timeout_s: float = 0.05, breaker: Breaker) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.ttl_s = ttl_s
        self.breaker = breaker
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        try:
            return list(await self.breaker.call(lambda: self._client.mget(list(keys))))
        except BreakerOpenError:
            return [None] * len(keys)
        except Exception as exc:  # Redis down or slow: bypass the cache
            log.warning("redis get failed, bypassing the cache: %s", exc)
            return [None] * len(keys)

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        async def _set() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, ex=self.ttl_s)
                await pipe.execute()

        try:
            await self.breaker.call(_set)
        except BreakerOpenError:
            pass
        except Exception as exc:
            log.warning("redis set failed, bypassing the cache: %s", exc)

    async def ping(self) -> bool:
        """True when Redis answers (used at start-up to log the cache backend)."""
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self._client.aclose()


def record_lookups(model: str, hits: int, misses: int) -> None:
    """Count cache hits and misses per row."""
    if hits:
        metrics.CACHE.labels(model=model, result="hit").inc(hits)
    if misses:
        metrics.CACHE.labels(model=model, result="miss").inc(misses)
