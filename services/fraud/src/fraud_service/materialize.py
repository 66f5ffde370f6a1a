"""Materialise the online features of the synthetic cards into Redis (the `fraud:card` feature view).

Run as::

    python -m fraud_service.materialize --redis-url redis://127.0.0.1:6379/0 [--cards 10000] [--seed 42]

Cards `card-000000` ... are drawn, seeded, from the distributions the fraud build's generator uses
(`build_model.generate_dataset`): 30-day average amount lognormal(3.9, 0.7), account age gamma(1.5, 700)
days, failed logins and chargebacks Poisson, behavioural components with the same scales, a home in one of a
few European countries, and their last day's transactions as events (about 3 a day, a burst for 3 % of
cards) so the 1 h / 24 h counts are live. Re-running replaces the cards (same seed: same cards, events
re-anchored to now).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import numpy as np

from fraud_service.online import PCA_NAMES, VIEW, WINDOWS
from mlplatform.features import OnlineFeatureStore

# (country, latitude, longitude) of a home region's centre; homes are spread ~1 degree around it
HOMES = [("FR", 48.86, 2.35), ("DE", 52.52, 13.40), ("ES", 40.42, -3.70), ("IT", 41.90, 12.50),
         ("NL", 52.37, 4.90), ("BE", 50.85, 4.35), ("PT", 38.72, -9.14), ("AT", 48.21, 16.37)]


def card_id(i: int) -> str:
    """The id of synthetic card `i`."""
    return f"card-{i:06d}"


def synthetic_cards(n: int, seed: int, now: float) -> tuple[dict[str, dict[str, float | str]],
                                                             dict[str, list[tuple[str, float]]]]:
    """(feature hash per card, events per card) for `n` cards."""
    rng = np.random.default_rng(seed)
    home = rng.integers(0, len(HOMES), n)
    lat = np.array([HOMES[h][1] for h in home]) + rng.normal(0, 0.5, n)
    lon = np.array([HOMES[h][2] for h in home]) + rng.normal(0, 0.7, n)
    age_days = np.floor(rng.gamma(1.5, 700.0, n))
    avg = np.round(np.maximum(rng.lognormal(3.9, 0.7, n), 1.0), 2)
    n_30d = rng.poisson(25, n) + 1
    failed = rng.poisson(0.05, n) + (rng.random(n) < 0.01) * rng.poisson(4.0, n)
    chargebacks = rng.poisson(0.05, n)
    pca = rng.normal(0.0, 1.0, (n, len(PCA_NAMES))) * (2.0 * 0.85 ** np.arange(len(PCA_NAMES)))
    burst = rng.random(n) < 0.03
    in_1h = rng.poisson(np.where(burst, 5.0, 0.3))
    in_24h = rng.poisson(3.0, n)
    rows: dict[str, dict[str, float | str]] = {}
    events: dict[str, list[tuple[str, float]]] = {}
    for i in range(n):
        cid = card_id(i)
        last_lat, last_lon = lat[i] + rng.normal(0, 0.05), lon[i] + rng.normal(0, 0.05)
        rows[cid] = {
            "home_lat": round(float(lat[i]), 5), "home_lon": round(float(lon[i]), 5),
            "home_country": HOMES[home[i]][0], "opened_at": round(now - float(age_days[i]) * 86400.0),
            "amount_sum_30d": round(float(avg[i] * n_30d[i]), 2), "amount_n_30d": float(n_30d[i]),
            "last_lat": round(float(last_lat), 5), "last_lon": round(float(last_lon), 5),
            "failed_logins_24h": float(failed[i]), "chargebacks_1y": float(chargebacks[i]),
            **{name: round(float(pca[i, j]), 5) for j, name in enumerate(PCA_NAMES)},
        }
        times = [now - float(rng.uniform(1, WINDOWS["txn_count_1h"])) for _ in range(in_1h[i])]
        times += [now - float(rng.uniform(WINDOWS["txn_count_1h"], WINDOWS["txn_count_24h"])) for _ in range(in_24h[i])]
        events[cid] = [(f"hist-{k}", t) for k, t in enumerate(times)]
        if times:
            rows[cid]["last_ts"] = round(max(times), 3)
    return rows, events


async def materialize(url: str, cards: int, seed: int) -> int:
    """Write `cards` synthetic cards into the feature view at `url`; returns the count."""
    store = OnlineFeatureStore(url, VIEW, WINDOWS, timeout_s=10.0)
    try:
        rows, events = synthetic_cards(cards, seed, time.time())
        return await store.write_entities(rows, events)
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fraud_service.materialize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the feature store's Redis")
    parser.add_argument("--cards", type=int, default=10_000, help="synthetic cards (default 10000)")
    parser.add_argument("--seed", type=int, default=42, help="seed (default 42, the fraud build's)")
    args = parser.parse_args(argv)
    if args.cards < 1:
        parser.error("--cards must be >= 1")
    started = time.perf_counter()
    try:
        n = asyncio.run(materialize(args.redis_url, args.cards, args.seed))
    except Exception as exc:  # Redis unreachable: say so in one line
        print(f"materialize: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"materialize: {n} cards into {VIEW}:<card_id> at {args.redis_url} "
          f"({card_id(0)} .. {card_id(n - 1)}) in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
