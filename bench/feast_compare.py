"""Feast's online read (Redis online store) against direct redis.asyncio reads, in one process, one Redis.

Feast does not install beside the platform (`feast[redis]` 0.63.0 requires redis<8; we pin redis 8.1.0), so
this runs in a throwaway virtualenv and imports nothing of the platform::

    python3 -m venv /tmp/feastvenv && /tmp/feastvenv/bin/pip install "feast[redis]==0.63.0"
    /tmp/feastvenv/bin/python bench/feast_compare.py [--cards 10000] [--reads 5000]

The same 21 features per card (fraud's `fraud:card` view: 20 numbers and the home country) are written twice:
by Feast (`write_to_online_store`: its layout, a hash per serialised entity key, murmur3-hashed field names,
protobuf values) and in the platform's layout (`mlplatform.features`: `fraud:card:<id>` hash of decimals
plus the events sorted set). Reads, sequential, one event loop, cards drawn from a Zipf law:

- feast: `FeatureStore.get_online_features_async` for the 21 features of one card, `to_dict()`;
- direct, Feast's layout: one `HGETALL` of Feast's key for the card (no decoding);
- direct, our layout: the platform's read, one pipeline of `HGETALL` + two `ZCOUNT`s, decoded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

NUMERIC = ["home_lat", "home_lon", "opened_at", "amount_sum_30d", "amount_n_30d", "last_lat", "last_lon",
           "failed_logins_24h", "chargebacks_1y", "last_ts", *(f"pca_{i:02d}" for i in range(1, 11))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def timed(fn, cards: list[str]) -> np.ndarray:
    lat = np.empty(len(cards))
    for i, card in enumerate(cards):
        t0 = time.perf_counter()
        await fn(card)
        lat[i] = (time.perf_counter() - t0) * 1000
    return lat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import pandas as pd
    import redis as redis_sync
    import redis.asyncio as aredis
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.repo_config import RegistryConfig, RepoConfig
    from feast.types import Float64, String

    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="feast-compare-"))
    try:
        time.sleep(0.5)
        rng = np.random.default_rng(42)
        ids = [f"card-{i:06d}" for i in range(args.cards)]
        data = {name: rng.normal(0, 1, args.cards).round(5) for name in NUMERIC}
        countries = rng.choice(["FR", "DE", "ES", "IT"], args.cards)
        now = datetime.now(UTC)
        df = pd.DataFrame({"card_id": ids, **data, "home_country": countries, "event_timestamp": now})
        df.to_parquet(tmp / "cards.parquet")

        config = RepoConfig(project="fraud", provider="local", entity_key_serialization_version=3,
                            registry=RegistryConfig(path=str(tmp / "registry.db")),
                            online_store={"type": "redis", "connection_string": f"127.0.0.1:{port}"})
        store = FeatureStore(config=config, repo_path=str(tmp))
        card = Entity(name="card", join_keys=["card_id"], value_type=ValueType.STRING)
        view = FeatureView(name="card_stats", entities=[card], online=True,
                           schema=[*(Field(name=n, dtype=Float64) for n in NUMERIC),
                                   Field(name="home_country", dtype=String)],
                           source=FileSource(path=str(tmp / "cards.parquet"), timestamp_field="event_timestamp"))
        store.apply([card, view])
        store.write_to_online_store("card_stats", df)
        features = [f"card_stats:{n}" for n in [*NUMERIC, "home_country"]]

        sync = redis_sync.Redis(port=port)
        pipe = sync.pipeline(transaction=False)
        for i, cid in enumerate(ids):
            pipe.hset(f"fraud:card:{cid}", mapping={**{n: repr(float(data[n][i])) for n in NUMERIC},
                                                    "home_country": str(countries[i])})
            pipe.zadd(f"fraud:card:{cid}:events", {f"e{k}": time.time() - 600 * k for k in range(4)})
        pipe.execute()

        weights = 1.0 / np.arange(1, args.cards + 1) ** 1.1
        cards = [ids[i] for i in rng.choice(args.cards, size=args.reads, p=weights / weights.sum())]
        client = aredis.Redis(port=port)

        def feast_key(cid: str) -> bytes:
            return _redis_key("fraud", EntityKey(join_keys=["card_id"], entity_values=[Value(string_val=cid)]), 3)

        async def feast_read(cid: str) -> None:
            got = (await store.get_online_features_async(features=features,
                                                         entity_rows=[{"card_id": cid}])).to_dict()
            assert got["home_lat"][0] is not None, got

        async def direct_feast_layout(cid: str) -> None:
            assert await client.hgetall(feast_key(cid))

        async def direct_our_layout(cid: str) -> None:
            t = time.time()
            async with client.pipeline(transaction=False) as p:
                p.hgetall(f"fraud:card:{cid}")
                p.zcount(f"fraud:card:{cid}:events", f"({t - 3600}", t)
                p.zcount(f"fraud:card:{cid}:events", f"({t - 86400}", t)
                found, c1, c24 = await p.execute()
            values = {k.decode(): v.decode() for k, v in found.items()}
            assert values and c24 >= c1

        readers = {"feast get_online_features_async": feast_read,
                   "direct HGETALL, Feast's layout": direct_feast_layout,
                   "direct pipeline, our layout (HGETALL + 2 ZCOUNT)": direct_our_layout}

        async def run() -> dict[str, np.ndarray]:
            for fn in readers.values():  # warm: connections, registry cache
                await timed(fn, cards[:200])
            out: dict[str, list[np.ndarray]] = {name: [] for name in readers}
            for _ in range(args.rounds):  # interleaved rounds: the shared machine's noise hits all alike
                for name, fn in readers.items():
                    out[name].append(await timed(fn, cards))
            return {name: np.concatenate(v) for name, v in out.items()}

        results = asyncio.run(run())
    finally:
        server.terminate()
        server.wait(10)
    rows = []
    md = ["| read | reads | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---|---|---|---|---|"]
    for name, lat in results.items():
        row = {"read": name, "reads": len(lat), "p50_ms": float(np.percentile(lat, 50)),
               "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99)),
               "mean_ms": float(lat.mean())}
        rows.append(row)
        md.append(f"| {name} | {row['reads']} | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | {row['p99_ms']:.3f} | "
                  f"{row['mean_ms']:.3f} |")
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "feast.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "feast.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
