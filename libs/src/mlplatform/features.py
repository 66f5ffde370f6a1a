"""Online feature store on Redis (redis.asyncio): one entity's features in one round trip, never an error.

Layout (Feast's data model: an entity key, a feature view, one value per feature; not Feast's binary
encoding, see BENCHMARKS.md "Online features"):

- `<view>:<entity id>`            HASH   feature name -> decimal value (materialised aggregates, running sums)
- `<view>:<entity id>:events`     ZSET   event id -> event time (Unix s): windowed counts are `ZCOUNT`s

A read is one pipeline (`HGETALL` plus one `ZCOUNT` per window) under a bounded timeout and a circuit
breaker. An entity with no hash is a cold start; a failed, slow or refused read is `unavailable`. Both give
the caller's defaults with the reason, so scoring goes on: the store is an input, not a dependency.
Writes (`record_event`) are the commands of one event, for a write-behind buffer (`mlplatform.audit`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter, Histogram

from mlplatform import tracing
from mlplatform.breaker import Breaker, BreakerOpenError

log = logging.getLogger(__name__)

Source = Literal["store", "cold_start", "store_unavailable"]

READS = Counter("feature_store_reads_total", "Online feature reads, by feature view and outcome",
                ["view", "outcome"])
READ_LATENCY = Histogram(
    "feature_store_read_duration_seconds", "Online feature read time (one pipeline), successful reads",
    ["view"], buckets=(0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1))


@dataclass(frozen=True)
class EntityFeatures:
    """One entity's stored features (empty unless `source` is `store`) and windowed event counts."""

    values: Mapping[str, str]
    counts: Mapping[str, int]
    source: Source


def hash_key(view: str, entity: str) -> str:
    """The entity's feature hash."""
    return f"{view}:{entity}"


def events_key(view: str, entity: str) -> str:
    """The entity's event-time sorted set."""
    return f"{view}:{entity}:events"


class OnlineFeatureStore:
    """Reads (and writes the events of) one feature view for entities by id.

    `windows` names the event counts read with every entity (`{"txn_count_1h": 3600}`): events whose time
    is in `(now - seconds, now]`. Events older than the longest window are trimmed on write.
    """

    def __init__(self, url: str, view: str, windows: Mapping[str, float], *, timeout_s: float = 0.02,
                 breaker: Breaker | None = None, ttl_s: int = 90 * 86400) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.view = view
        self.windows = dict(windows)
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.breaker = breaker or Breaker(f"features-{view}", fail_max=5, reset_timeout_s=5.0)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), health_check_interval=0)

    async def _read(self, entity: str, now: float) -> tuple[dict[bytes, bytes], list[int]]:
        async with asyncio.timeout(self.timeout_s), self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(hash_key(self.view, entity))
            for seconds in self.windows.values():
                pipe.zcount(events_key(self.view, entity), f"({now - seconds}", now)
            found, *counts = await pipe.execute()
        return found, counts

    async def read(self, entity: str, now: float | None = None) -> EntityFeatures:
        """The entity's features; `cold_start` when it has none, `store_unavailable` when the read failed,
        timed out (`timeout_s`) or the breaker is open. Never raises for the store's sake."""
        now = time.time() if now is None else now
        started = time.perf_counter()
        with tracing.span("features.read", **{"features.view": self.view, "features.entity": entity}):
            try:
                found, counts = await self.breaker.call(lambda: self._read(entity, now))
            except BreakerOpenError:
                READS.labels(self.view, "breaker_open").inc()
                return EntityFeatures({}, {}, "store_unavailable")
            except Exception as exc:  # down, slow, refused: defaults, flagged by the caller
                READS.labels(self.view, "error").inc()
                log.warning("feature store read of %s:%s failed (%s); defaults used", self.view, entity,
                            type(exc).__name__)
                return EntityFeatures({}, {}, "store_unavailable")
        READ_LATENCY.labels(self.view).observe(time.perf_counter() - started)
        if not found:
            READS.labels(self.view, "cold_start").inc()
            return EntityFeatures({}, {}, "cold_start")
        READS.labels(self.view, "hit").inc()
        values = {k.decode(): v.decode() for k, v in found.items()}
        return EntityFeatures(values, dict(zip(self.windows, map(int, counts), strict=True)), "store")

    def record_event(self, pipe: Any, entity: str, event_id: str, event_time: float, *,
                     increments: Mapping[str, float] = {}, values: Mapping[str, float] = {}) -> None:
        """Queue on `pipe` the writes of one event: its time in the event set (old events trimmed), sums
        incremented and latest values set in the hash, both keys' TTL renewed. A cold-start entity's hash is
        created by its first event (features it lacks keep their defaults)."""
        events = events_key(self.view, entity)
        pipe.zadd(events, {event_id: event_time})
        pipe.zremrangebyscore(events, "-inf", f"({event_time - max(self.windows.values(), default=0)}")
        pipe.expire(events, self.ttl_s)
        key = hash_key(self.view, entity)
        for name, amount in increments.items():
            pipe.hincrbyfloat(key, name, amount)
        if values:
            pipe.hset(key, mapping={k: repr(float(v)) for k, v in values.items()})
        pipe.expire(key, self.ttl_s)

    async def write_entities(self, rows: Mapping[str, Mapping[str, float | str]],
                             events: Mapping[str, Sequence[tuple[str, float]]] = {}, chunk: int = 2000) -> int:
        """Materialise: replace each entity's hash with `rows[entity]` and its events with `events[entity]`
        (id, time); pipelined in chunks. Returns the entities written."""
        items = list(rows.items())
        for start in range(0, len(items), chunk):
            async with self.client.pipeline(transaction=False) as pipe:
                for entity, values in items[start:start + chunk]:
                    key = hash_key(self.view, entity)
                    pipe.delete(key, events_key(self.view, entity))
                    pipe.hset(key, mapping={k: v if isinstance(v, str) else repr(float(v))
                                            for k, v in values.items()})
                    pipe.expire(key, self.ttl_s)
                    if events.get(entity):
                        pipe.zadd(events_key(self.view, entity), dict(events[entity]))
                        pipe.expire(events_key(self.view, entity), self.ttl_s)
                await pipe.execute()
        return len(items)

    async def close(self) -> None:
        await self.client.aclose()
