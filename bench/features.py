"""Online feature read latency: fraud's `OnlineFeatureStore.read` (one redis.asyncio pipeline: HGETALL + two
ZCOUNTs) against a real Redis holding the materialised cards, from one event loop like the service's.

    python -m bench.features [--reads 20000] [--concurrency 1,16] [--out DIR]

Cards are drawn from the bench's Zipf law (bench.loadgen.card_transactions). Prints and writes
`features.json` / `features.md`: p50 / p90 / p99 / max per concurrency, and reads per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import CARDS, card_transactions
from mlplatform.launch import RedisServer


async def measure(url: str, cards: list[str], concurrency: int) -> dict[str, Any]:
    """Read every card in `cards` with `concurrency` reads in flight; latency per read (ms)."""
    from fraud_service.online import VIEW, WINDOWS
    from mlplatform.features import OnlineFeatureStore

    store = OnlineFeatureStore(url, VIEW, WINDOWS, timeout_s=0.5)
    try:
        for card in cards[:200]:  # connections opened, Redis warm
            await store.read(card)
        lat = np.empty(len(cards))
        sources: dict[str, int] = {}
        queue = iter(enumerate(cards))

        async def worker() -> None:
            for i, card in queue:
                t0 = time.perf_counter()
                got = await store.read(card)
                lat[i] = (time.perf_counter() - t0) * 1000
                sources[got.source] = sources.get(got.source, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    return {"concurrency": concurrency, "reads": len(cards), "reads_per_s": len(cards) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()), "sources": sources}


def main(argv: list[str] | None = None) -> int:
    from fraud_service.materialize import materialize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cards = [tx["card_id"] for tx in card_transactions(args.reads, seed=3)]
    redis = RedisServer().start()
    try:
        asyncio.run(materialize(redis.url, CARDS, 42))
        results = [asyncio.run(measure(redis.url, cards, int(c))) for c in args.concurrency.split(",")]
    finally:
        redis.stop()
    md = ["| reads in flight | reads | reads/s | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|"]
    for r in results:
        md.append(f"| {r['concurrency']} | {r['reads']} | {r['reads_per_s']:.0f} | {r['p50_ms']:.3f} | "
                  f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['max_ms']:.2f} |")
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "features.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "features.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
