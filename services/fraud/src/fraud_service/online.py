"""Scoring by card: the transaction's own fields + the card's online aggregates -> the model's 30 features.

Feature view `fraud:card` on Redis (`mlplatform.features`), entity `card_id`:

- hash `fraud:card:<card_id>`: `home_lat`, `home_lon`, `home_country`, `opened_at` (Unix s),
  `amount_sum_30d`, `amount_n_30d`, `last_lat`, `last_lon`, `last_ts`, `failed_logins_24h`,
  `chargebacks_1y`, `pca_01` ... `pca_12` (materialised by `fraud_service.materialize`);
- sorted set `fraud:card:<card_id>:events`: one member per transaction, scored by its time:
  `txn_count_1h` / `txn_count_24h` are the transactions before this one in the last hour / day.

Every scored transaction is written back off the hot path (`mlplatform.audit.WriteBehind`): its event, the
30-day sums, the last location; and every prediction is appended to the audit stream `fraud:audit`.
The event counts are exact sliding windows; the 30-day sums only grow between materialisations (a batch job
re-windows them: `fraud_service.materialize` stands in for it here).

Cold start (card unknown to the store) and store unavailable (down, over the timeout, breaker open) use the
same defaults, and the answer says which (`feature_source`): no transactions in the windows, 30-day average =
this amount (ratio 1), account age 365 days, no failed logins or chargebacks, distances 0 when there is no
home or last location, not foreign when the home country is unknown, behavioural components 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fraud.v1 import fraud_pb2 as pb

from mlplatform.audit import AuditLog, WriteBehind
from mlplatform.breaker import Breaker
from mlplatform.errors import InvalidInputError, ServingError
from mlplatform.features import EntityFeatures, OnlineFeatureStore

log = logging.getLogger(__name__)

VIEW = "fraud:card"
WINDOWS = {"txn_count_1h": 3600.0, "txn_count_24h": 86400.0}
N_PCA = 12
PCA_NAMES = [f"pca_{i:02d}" for i in range(1, N_PCA + 1)]
MAX_AMOUNT = 1_000_000.0
COLD_ACCOUNT_AGE_DAYS = 365.0
_CARD_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MCC = re.compile(r"^[0-9]{4}$")
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")

MERCHANT_RISK: dict[str, float] = {
    "5411": 0.06,  # grocery stores
    "5812": 0.08,  # restaurants
    "5814": 0.07,  # fast food
    "4111": 0.05,  # commuter transport
    "5541": 0.12,  # service stations
    "5311": 0.15,  # department stores
    "5912": 0.10,  # drug stores
    "4511": 0.30,  # airlines
    "7011": 0.25,  # hotels
    "5732": 0.45,  # electronics
    "5944": 0.55,  # jewellery
    "5999": 0.35,  # miscellaneous retail
    "4829": 0.70,  # money transfer
    "6051": 0.65,  # quasi-cash, crypto
    "7995": 0.75,  # gambling
}
"""Merchant category code -> fraud risk of the category (0-1); an unlisted code gets DEFAULT_MERCHANT_RISK."""
DEFAULT_MERCHANT_RISK = 0.18  # the training population's median merchant risk (Beta(2, 8))


@dataclass(frozen=True)
class CardTransaction:
    """A checked scoring-by-card request item and the feature row assembled for it."""

    tx: pb.Transaction
    row: np.ndarray  # float32[30]
    source: str  # store | cold_start | store_unavailable
    event_time: float


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(a)))


def check(tx: pb.Transaction, field: str, now: float) -> float:
    """INVALID_ARGUMENT naming the field for a bad scoring-by-card item; returns the event time."""
    def bad(name: str, why: str) -> InvalidInputError:
        return InvalidInputError(f"{field}.{name}: {why}" if field else f"{name}: {why}")

    if len(tx.features):
        raise bad("features", "give either the 30 features or card_id with the transaction's fields, not both")
    if not _CARD_ID.match(tx.card_id):
        raise bad("card_id", "1-64 characters of A-Z a-z 0-9 _ . : -")
    if not (math.isfinite(tx.amount) and 0 < tx.amount <= MAX_AMOUNT):
        raise bad("amount", f"required, > 0 and <= {MAX_AMOUNT:,.0f} EUR (got {tx.amount})")
    if tx.channel not in (pb.CARD_PRESENT, pb.ONLINE, pb.CARD_NOT_PRESENT):
        raise bad("channel", "required: CARD_PRESENT, ONLINE or CARD_NOT_PRESENT")
    if tx.merchant_category and not _MCC.match(tx.merchant_category):
        raise bad("merchant_category", f"four digits (ISO 18245), got {tx.merchant_category!r}")
    if tx.merchant_country and not _COUNTRY.match(tx.merchant_country):
        raise bad("merchant_country", f"ISO 3166 alpha-2, got {tx.merchant_country!r}")
    if not (math.isfinite(tx.latitude) and -90 <= tx.latitude <= 90):
        raise bad("latitude", f"in [-90, 90], got {tx.latitude}")
    if not (math.isfinite(tx.longitude) and -180 <= tx.longitude <= 180):
        raise bad("longitude", f"in [-180, 180], got {tx.longitude}")
    if tx.timestamp < 0 or tx.timestamp > now + 86400:
        raise bad("timestamp", f"Unix seconds, not negative and not more than a day ahead (got {tx.timestamp})")
    return float(tx.timestamp) if tx.timestamp else now


def assemble(tx: pb.Transaction, stored: EntityFeatures, event_time: float) -> np.ndarray:
    """The model's 30 features (build_model.FEATURES order) from the transaction and the card's aggregates."""
    v = stored.values
    amount = float(tx.amount)
    when = datetime.fromtimestamp(event_time, UTC)
    located = bool(tx.latitude or tx.longitude)

    def distance(lat: str, lon: str) -> float:
        if not located or lat not in v or lon not in v:
            return 0.0
        return haversine_km(float(v[lat]), float(v[lon]), tx.latitude, tx.longitude)

    n_30d = float(v.get("amount_n_30d", 0.0))
    avg = float(v["amount_sum_30d"]) / n_30d if n_30d > 0 and "amount_sum_30d" in v else amount
    avg = max(avg, 0.01)
    c1h = float(stored.counts.get("txn_count_1h", 0))
    c24h = float(stored.counts.get("txn_count_24h", 0))
    home_country = str(v.get("home_country", ""))
    foreign = bool(home_country and tx.merchant_country and tx.merchant_country.upper() != home_country)
    age_days = ((event_time - float(v["opened_at"])) / 86400.0 if "opened_at" in v else COLD_ACCOUNT_AGE_DAYS)
    row = [
        amount, when.hour, when.weekday(), MERCHANT_RISK.get(tx.merchant_category, DEFAULT_MERCHANT_RISK),
        distance("home_lat", "home_lon"), distance("last_lat", "last_lon"), c1h, c24h, avg, amount / avg,
        float(tx.channel == pb.CARD_PRESENT), float(tx.channel == pb.ONLINE), float(foreign),
        float(tx.new_device), max(age_days, 0.0), float(v.get("failed_logins_24h", 0.0)),
        float(v.get("chargebacks_1y", 0.0)), 1.0 - math.exp(-(c1h / 4.0 + c24h / 40.0)),
        *(float(v.get(name, 0.0)) for name in PCA_NAMES),
    ]
    return np.clip(np.asarray(row, dtype=np.float64), _LO, _HI).astype(np.float32)


def _ranges() -> tuple[np.ndarray, np.ndarray]:
    from fraud_service.build_model import FEATURES

    return np.array([f[1] for f in FEATURES]), np.array([f[2] for f in FEATURES])


_LO, _HI = _ranges()


def repeat_key(tx: pb.Transaction) -> str:
    """The cache identity of a transaction: the same card with the same amount, merchant, place, channel and
    device. Time is left out on purpose: the cache's TTL is the repeat window."""
    fields = (tx.card_id, f"{tx.amount:.2f}", tx.merchant_category, tx.merchant_country.upper(),
              f"{tx.latitude:.3f}", f"{tx.longitude:.3f}", int(tx.channel), int(tx.new_device))
    digest = hashlib.sha256(repr(fields).encode()).hexdigest()[:32]
    return f"card:{tx.card_id}:{digest}"


@dataclass(frozen=True)
class Scored:
    """What one prediction writes behind: the card's update and the audit record."""

    card_id: str
    event_id: str
    event_time: float
    amount: float
    latitude: float
    longitude: float
    located: bool
    record: Mapping[str, str | int | float]


class OnlineFeatures:
    """The fraud service's feature store client and its write-behind (card updates + audit stream)."""

    def __init__(self, url: str, *, timeout_s: float, breaker: Breaker, audit_stream: str, audit_max_len: int,
                 buffer_items: int, write_timeout_s: float = 1.0) -> None:
        self.store = OnlineFeatureStore(url, VIEW, WINDOWS, timeout_s=timeout_s, breaker=breaker)
        self.audit = AuditLog(self.store.client, audit_stream, audit_max_len)
        self.writes: WriteBehind[Scored] = WriteBehind("fraud", self._write, max_items=buffer_items,
                                                       timeout_s=write_timeout_s)

    async def _write(self, items: Sequence[Scored]) -> None:
        async with self.store.client.pipeline(transaction=False) as pipe:
            for s in items:
                if s.card_id:
                    values = {"last_lat": s.latitude, "last_lon": s.longitude} if s.located else {}
                    self.store.record_event(pipe, s.card_id, s.event_id, s.event_time,
                                            increments={"amount_sum_30d": s.amount, "amount_n_30d": 1.0},
                                            values={**values, "last_ts": s.event_time})
                self.audit.append(pipe, s.record)
            await pipe.execute()

    async def prepare_one(self, tx: pb.Transaction, field: str) -> CardTransaction:
        now = time.time()
        event_time = check(tx, field, now)
        stored = await self.store.read(tx.card_id, now=event_time)
        return CardTransaction(tx, assemble(tx, stored, event_time), stored.source, event_time)


_online: OnlineFeatures | None = None
_UNAVAILABLE = EntityFeatures({}, {}, "store_unavailable")


def online() -> OnlineFeatures | None:
    """The running service's feature store client (None when no Redis is configured)."""
    return _online


async def prepare(model: Any, items: Sequence[pb.Transaction], fields: Sequence[str]
                  ) -> list[pb.Transaction | CardTransaction | ServingError]:
    """TypedApi.prepare: raw-feature items pass through; card items are checked, read and assembled
    (concurrently for a batch); a bad item becomes its INVALID_ARGUMENT."""
    async def one(tx: pb.Transaction, field: str) -> pb.Transaction | CardTransaction | ServingError:
        if not tx.card_id:
            return tx
        try:
            if _online is None:  # no feature store configured: defaults, flagged
                event_time = check(tx, field, time.time())
                return CardTransaction(tx, assemble(tx, _UNAVAILABLE, event_time), "store_unavailable", event_time)
            return await _online.prepare_one(tx, field)
        except ServingError as err:
            return err

    if len(items) == 1:
        return [await one(items[0], fields[0])]
    return list(await asyncio.gather(*(one(tx, f) for tx, f in zip(items, fields, strict=True))))


def record_prediction(tx: pb.Transaction, item: Any, prediction: pb.FraudPrediction) -> None:
    """Write the card's update and the audit record behind (never waits; dropped and counted when full)."""
    if _online is None:
        return
    card = item if isinstance(item, CardTransaction) else None
    event_id = tx.transaction_id or uuid.uuid4().hex
    record = {
        "request_id": event_id, "card_id": tx.card_id, "model": prediction.model_name,
        "version": prediction.model_version, "score": f"{prediction.fraud_probability:.6f}",
        "decision": "fraud" if prediction.is_fraud else "legit", "threshold": f"{prediction.threshold:.6f}",
        "fallback": int(prediction.fallback), "cached": int(prediction.cached),
        "feature_source": prediction.feature_source, "ts": f"{time.time():.3f}",
    }
    _online.writes.submit(Scored(
        card_id=tx.card_id if card else "", event_id=event_id,
        event_time=card.event_time if card else 0.0, amount=float(tx.amount),
        latitude=tx.latitude, longitude=tx.longitude, located=bool(tx.latitude or tx.longitude), record=record))


@asynccontextmanager
async def lifespan(settings: Any) -> AsyncIterator[None]:
    """ServiceSpec.lifespan: the feature store client and write-behind while the service runs."""
    global _online
    url = settings.feature_store_url or settings.redis_url
    if not url:
        log.warning("fraud: no FRAUD_FEATURE_STORE_URL or REDIS_URL: scoring by card uses the cold-start defaults "
                    "(feature_source store_unavailable), no audit log")
        yield
        return
    breaker = Breaker("features", fail_max=settings.breaker_fail_max,
                      reset_timeout_s=settings.feature_breaker_reset_s)
    _online = OnlineFeatures(url, timeout_s=settings.feature_timeout_ms / 1000, breaker=breaker,
                             audit_stream=settings.audit_stream, audit_max_len=settings.audit_max_len,
                             buffer_items=settings.write_buffer_items)
    _online.writes.start()
    try:  # open the first connection now, not inside the first request's 20 ms
        await asyncio.wait_for(_online.store.client.ping(), 2.0)
    except Exception as exc:
        log.warning("fraud: feature store at %s not answering yet (%s); requests use defaults until it does", url,
                    type(exc).__name__)
    log.info("fraud: online features from %s (view %s, timeout %.0f ms), audit stream %s", url, VIEW,
             settings.feature_timeout_ms, settings.audit_stream)
    try:
        yield
    finally:
        current, _online = _online, None
        await current.writes.close()
        await current.store.close()
