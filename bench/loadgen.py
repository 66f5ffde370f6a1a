"""Open-loop load generator: requests leave on a fixed arrival schedule, whatever the server does.

Coordinated omission: a closed-loop client (N workers, each waiting for its answer) sends less when
the server slows down, so the slow period produces few samples and the percentiles look good.
Here every request has an *intended* send time fixed before the run (constant rate per phase; a
piecewise schedule for the spike). A request is started at its intended time whether or not
earlier ones have answered, and its latency is measured **from the intended time**, so a send
the generator itself could not make on time (event loop busy) still counts its lateness. The
generator's own lag (actual start - intended) is recorded per request and summarised, and a
request that finds `max_in_flight` requests already outstanding is not sent and is counted as
`dropped` (never silently skipped), so achieved vs offered is always visible.

The schedule is split round-robin over `processes` worker processes (spawned, each with its own
event loop and connections: one Python event loop cannot keep 1000 req/s on this machine). They
share one wall-clock start time. Each returns its records; `run()` merges them.

Targets (`Target`): native gRPC (typed `Predict`, direct or through the gateway with a bearer
token in metadata), REST `POST /api/v1/<model>` (a minimal keep-alive HTTP/1.1 client on asyncio's
transports, or aiohttp as `rest_aiohttp`; a pool of tokens rotated per request,
so a pool of >= 0.6 * rate distinct standard-tier keys stays under the gateway's 100 req/min per
key) and the Open Inference Protocol v2 (`ModelInfer`, gRPC). Payloads are built in the worker
from a picklable `Payloads` description.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"

# Status values of a record besides "ok": gRPC status names (lower case) or "http_<code>".
DROPPED = "dropped"  # never sent: the generator had max_in_flight outstanding requests
TIMEOUT = "timeout"
GENERATOR_ERROR = "generator_error"  # the worker that owned the request failed or hung: no outcome
REFUSALS = frozenset({"resource_exhausted", "http_429", "http_503", "unavailable"})
"""Statuses a server (or the gateway) answers when it sheds load: counted apart from timeouts and errors."""
RATE_LIMITED = "rate_limited"
"""The gateway's per-key rate limit (not the server shedding load): the bench's keys were too few."""
TIMEOUTS = frozenset({TIMEOUT, "http_504"})
"""The client's own deadline, or the gateway's upstream timeout."""
NOT_SENT = frozenset({DROPPED, GENERATOR_ERROR})


@dataclass(frozen=True)
class Phase:
    """`rate` requests per second for `duration_s` seconds."""

    duration_s: float
    rate: float


def arrivals(phases: list[Phase]) -> np.ndarray:
    """Intended send times (seconds from the start) of a piecewise-constant-rate schedule, evenly spaced."""
    times, t0 = [], 0.0
    for p in phases:
        n = round(p.duration_s * p.rate)
        if n:
            times.append(t0 + (np.arange(n) + 0.5) / p.rate)
        t0 += p.duration_s
    return np.concatenate(times) if times else np.zeros(0)


@dataclass(frozen=True)
class Target:
    """Where one kind of request goes.

    kind: "grpc" (typed Predict), "rest" (POST /api/v1/<model>) or "oip" (ModelInfer).
    address: host:port. tokens: bearer tokens, rotated per request (empty: no auth header).
    weight: share of the arrivals in a mix.
    """

    model: str
    kind: str
    address: str
    tokens: tuple[str, ...] = ()
    weight: float = 1.0
    payloads: Payloads | None = None

    @property
    def name(self) -> str:
        return f"{self.model}/{self.kind}"


@dataclass(frozen=True)
class Payloads:
    """Which inputs to send: `source` names a data set (see `load_inputs`), `repeat_fraction` of the
    requests reuse an input sent earlier (a realistic cache workload), the rest are distinct."""

    source: str
    repeat_fraction: float = 0.0
    seed: int = 0
    pool: int = 20_000


def load_inputs(model: str, n: int, seed: int) -> list[Any]:
    """`n` distinct inputs for a model: fraud feature rows (synthetic, as the model was trained on),
    cnn held-out digits as PNG bytes, sentiment texts from the project's data set (varied to be distinct)."""
    if model == "fraud":
        from fraud_service.build_model import generate_dataset

        x, _ = generate_dataset(n, seed=1000 + seed)
        return [row.astype(np.float32).tolist() for row in x]
    if model == "cnn":
        from PIL import Image

        data = np.load(MODEL_REPOSITORY / "cnn" / "1" / "heldout.npz")
        images = data["images"]
        out = []
        for i in range(min(n, 4 * len(images))):
            img = images[i % len(images)].astype(np.float32)
            if i >= len(images):  # more than the held-out set: shift by a pixel, still a digit
                img = np.roll(img, (i // len(images)) % 3 - 1, axis=1)
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
    if model == "sentiment":
        path = ROOT / "services" / "sentiment" / "data" / "sentiment.jsonl"
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(texts))
        return [texts[order[i % len(texts)]] + ("" if i < len(texts) else f" (#{i})") for i in range(n)]
    raise ValueError(f"unknown model {model!r}")


CARDS_SOURCE = "fraud-cards"
"""Payloads source: fraud transactions by card_id (online features), customers drawn from a Zipf law."""
CARDS = 10_000  # fraud_service.materialize's default: card-000000 ... card-009999
ZIPF_S = 1.1  # the rank-frequency exponent of customers' activity
HABITS = 4  # recurring transactions per card (same amount, merchant, place, channel)
HABIT_SHARE = 0.6  # share of a card's transactions that are one of its habits
_MCCS = ("5411", "5812", "5814", "4111", "5541", "5311", "5912", "5732", "5999", "4511")


def _habits(card: int) -> list[dict[str, Any]]:
    """Card `card`'s recurring transactions (fixed per card, whichever worker draws them)."""
    rng = np.random.default_rng(10_000_000 + card)
    lat, lon = 40 + 12 * rng.random(), -5 + 20 * rng.random()
    return [{"card_id": f"card-{card:06d}", "amount": round(float(rng.lognormal(3.6, 0.8)), 2),
             "merchant_category": _MCCS[int(rng.integers(len(_MCCS)))], "merchant_country": "FR",
             "latitude": round(lat + rng.normal(0, 0.02), 4), "longitude": round(lon + rng.normal(0, 0.02), 4),
             "channel": int(rng.choice([1, 1, 2, 3]))} for _ in range(HABITS)]


def card_transactions(n: int, seed: int, cards: int = CARDS) -> list[dict[str, Any]]:
    """`n` scoring-by-card requests (Transaction fields): the card drawn with probability ~ 1 / rank^ZIPF_S, then
    one of its HABITS recurring transactions with probability HABIT_SHARE, else a new one (its own amount)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, cards + 1) ** ZIPF_S
    drawn = rng.choice(cards, size=n, p=weights / weights.sum())
    habits: dict[int, list[dict[str, Any]]] = {}
    out = []
    for card in map(int, drawn):
        if card not in habits:
            habits[card] = _habits(card)
        if rng.random() < HABIT_SHARE:
            tx = dict(habits[card][int(rng.integers(HABITS))])
        else:
            tx = {**habits[card][0], "amount": round(float(rng.lognormal(3.9, 0.9)), 2),
                  "merchant_category": _MCCS[int(rng.integers(len(_MCCS)))]}
        out.append(tx)
    return out


def input_sequence(p: Payloads, model: str, n: int) -> list[Any]:
    """The inputs of `n` consecutive requests: distinct ones, with `repeat_fraction` repeats of earlier ones
    (or, for the `fraud-cards` source, transactions by card with Zipf-drawn customers)."""
    if p.source == CARDS_SOURCE:
        return card_transactions(n, p.seed)
    rng = np.random.default_rng(p.seed)
    distinct = load_inputs(model, min(n, p.pool), p.seed)
    seq, sent = [], 0
    for _ in range(n):
        if sent and rng.random() < p.repeat_fraction:
            seq.append(distinct[int(rng.integers(0, sent))])
        else:
            seq.append(distinct[sent % len(distinct)])
            sent += 1
    return seq


# ---------------------------------------------------------------- request senders (in the worker)

class Sender:
    """Sends one request of a target; returns a status string ("ok" or the error)."""

    def __init__(self, target: Target, inputs: list[Any], timeout_s: float) -> None:
        self.target, self.inputs, self.timeout_s = target, inputs, timeout_s
        self.i = 0

    def next_input(self) -> Any:
        x = self.inputs[self.i % len(self.inputs)]
        self.i += 1
        return x

    def next_token(self) -> str | None:
        toks = self.target.tokens
        return toks[self.i % len(toks)] if toks else None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self) -> str:
        raise NotImplementedError


class GrpcSender(Sender):
    """Typed `<model>.v1.<Model>Service/Predict` over one grpc.aio channel per worker. Requests are serialised
    before the clock starts and answers are not parsed (identity (de)serialisers): the generator shares the
    machine's cores with the servers, so its CPU per request is kept small."""

    method = ""

    async def open(self) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(self.target.address)
        m = self.target.model
        self.pb = __import__(f"{m}.v1.{m}_pb2", fromlist=["x"])
        self.method = f"/{m}.v1.{m.capitalize()}Service/Predict"
        self._prepare()

    def _prepare(self) -> None:
        self.call = self.channel.unary_unary(self.method)  # bytes in, bytes out
        self.payloads = [self.request(x).SerializeToString() for x in self.inputs]
        toks = self.target.tokens
        self.metadata = [(("authorization", f"Bearer {t}"),) for t in toks] or [None]

    def request(self, x: Any) -> Any:
        m = self.target.model
        if m == "fraud":
            tx = self.pb.Transaction(**x) if isinstance(x, dict) else self.pb.Transaction(features=x)
            return self.pb.PredictRequest(transaction=tx)
        if m == "cnn":
            return self.pb.PredictRequest(image=x)
        return self.pb.PredictRequest(text=x)

    async def send(self) -> str:
        i = self.i
        self.i += 1
        try:
            await self.call(self.payloads[i % len(self.payloads)], timeout=self.timeout_s,
                            metadata=self.metadata[i % len(self.metadata)])
            return "ok"
        except self.grpc.aio.AioRpcError as e:
            code = e.code()
            if code == self.grpc.StatusCode.DEADLINE_EXCEEDED:
                return TIMEOUT
            if code == self.grpc.StatusCode.RESOURCE_EXHAUSTED and _key_exhausted(
                    (*(e.initial_metadata() or ()), *(e.trailing_metadata() or ()))):
                return RATE_LIMITED
            return code.name.lower()

    async def close(self) -> None:
        await self.channel.close()


class OipSender(GrpcSender):
    """Open Inference Protocol v2 `ModelInfer` (the generated `inference` stubs; worker process only)."""

    async def open(self) -> None:
        import grpc
        from inference import grpc_service_pb2 as pb

        self.grpc, self.pb = grpc, pb
        self.channel = grpc.aio.insecure_channel(self.target.address)
        self.method = "/inference.GRPCInferenceService/ModelInfer"
        self._prepare()

    def request(self, x: Any) -> Any:
        pb, m = self.pb, self.target.model
        req = pb.ModelInferRequest(model_name=m)
        if m == "fraud":
            t = req.inputs.add(name="features", datatype="FP32", shape=[1, len(x)])
            t.contents.fp32_contents.extend(x)
        elif m == "sentiment":
            t = req.inputs.add(name="text", datatype="BYTES", shape=[1])
            t.contents.bytes_contents.append(x.encode())
        else:
            raise ValueError("OIP load for cnn needs pixel tensors; use the typed API")
        return req


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection carrying one request at a time (no pipelining). The response
    is parsed only as far as the status, the headers and the body's end (Content-Length or chunked)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bool]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            done = self._response()
            if done is not None:
                self.waiter.set_result(done)

    def _response(self) -> tuple[int, dict[str, str], bool] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        pos = end + 4
        if "content-length" in headers:
            pos += int(headers["content-length"])
            if len(self.buf) < pos:
                return None
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                eol = self.buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    tail = self.buf.find(b"\r\n\r\n", eol)  # the last chunk, optional trailers, a blank line
                    if tail < 0:
                        return None
                    pos = tail + 4
                    break
                pos = eol + 2 + size + 2
                if len(self.buf) < pos:
                    return None
        elif status not in (204, 304):
            return None  # a body delimited by the connection's close: answered in connection_lost
        del self.buf[:pos]
        return status, headers, headers.get("connection", "").lower() != "close"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:  # read-until-close body
                status = int(bytes(self.buf[:end]).split(b" ", 2)[1])
                self.waiter.set_result((status, {}, False))
            else:
                self.waiter.set_exception(ConnectionResetError("connection closed before the response"))


class RestSender(Sender):
    """`POST /api/v1/<model>` with JSON over a pool of at most 256 keep-alive HTTP/1.1 connections per worker (a
    request waiting for a free connection still counts its wait in its latency). A minimal client on asyncio's
    transports: each request is one write of bytes built before the clock starts, and each response is read
    only to its status and end, because the generator's CPU per request is part of the machine's budget
    (fraud REST through Envoy at 400 req/s: 0.32 ms of CPU per request, against 0.53 ms with aiohttp)."""

    limit = 256

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, port = self.target.address.rsplit(":", 1)
        self.port = int(port)
        path = f"/api/v1/{self.target.model}"
        head = f"POST {path} HTTP/1.1\r\nHost: {self.target.address}\r\nContent-Type: application/json\r\n"
        toks = self.target.tokens
        self.heads = [(head + f"Authorization: Bearer {t}\r\n").encode() for t in toks] or [head.encode()]
        self.bodies = [b"Content-Length: %d\r\n\r\n%s" % (len(b), b) for b in map(self.body, self.inputs)]
        self.idle: list[_HttpConnection] = []
        self.waiters: collections.deque[asyncio.Future[_HttpConnection | None]] = collections.deque()
        self.n_open = 0

    def body(self, x: Any) -> bytes:
        m = self.target.model
        if m == "fraud":
            return json.dumps({"transaction": {"features": x}}).encode()
        if m == "cnn":
            return json.dumps({"image": base64.b64encode(x).decode()}).encode()
        return json.dumps({"text": x}).encode()

    async def _acquire(self) -> _HttpConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.n_open -= 1
        if self.n_open >= self.limit:
            fut: asyncio.Future[_HttpConnection | None] = self.loop.create_future()
            self.waiters.append(fut)
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(fut.result())  # handed over just as the wait was cancelled: pass it on
                raise
            if got is not None:
                return got
        self.n_open += 1  # a new connection (or a waiter told to open one in place of a closed one)
        try:
            _, conn = await self.loop.create_connection(_HttpConnection, self.host, self.port)
        except BaseException:
            self._release(None)
            raise
        return conn

    def _release(self, conn: _HttpConnection | None) -> None:
        """Back to the pool, or (None, or a connection that cannot be reused) closed, letting a waiter open one."""
        if conn is None or conn.closed:
            self.n_open -= 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = None
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(conn)  # None: the waiter opens a connection in place of the closed one
                return
        if conn is not None:
            self.idle.append(conn)

    async def send(self) -> str:
        i = self.i
        self.i += 1
        conn = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self._acquire()
                conn.waiter = self.loop.create_future()
                conn.transport.write(self.heads[i % len(self.heads)] + self.bodies[i % len(self.bodies)])
                status, headers, keep = await conn.waiter
                conn.waiter = None
                if not keep:
                    conn.closed = True
        except TimeoutError:
            if conn is not None:
                conn.closed = True  # its answer may still come: the connection cannot be reused
            return TIMEOUT
        except OSError as e:
            if conn is not None:
                conn.closed = True
            return f"client_{type(e).__name__}"
        finally:
            if conn is not None:
                self._release(conn)
        if status == 200:
            return "ok"
        if status == 429 and _key_exhausted(headers.items()):
            return RATE_LIMITED
        return f"http_{status}"

    async def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class AiohttpRestSender(RestSender):
    """The same REST calls through aiohttp (kind "rest_aiohttp"): for comparing the generator's own cost."""

    async def open(self) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limit),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self.url = f"http://{self.target.address}/api/v1/{self.target.model}"
        self.bodies = [self.body(x) for x in self.inputs]  # JSON encoded once, before the clock starts
        toks = self.target.tokens
        self.headers = [{"content-type": "application/json", "authorization": f"Bearer {t}"} for t in toks] or [
            {"content-type": "application/json"}]

    async def send(self) -> str:
        i = self.i
        self.i += 1
        try:
            async with self.session.post(self.url, data=self.bodies[i % len(self.bodies)],
                                         headers=self.headers[i % len(self.headers)]) as resp:
                await resp.read()
                if resp.status == 200:
                    return "ok"
                if resp.status == 429 and _key_exhausted(resp.headers.items()):
                    return RATE_LIMITED
                return f"http_{resp.status}"
        except TimeoutError:
            return TIMEOUT
        except self.aiohttp.ClientError as e:
            return f"client_{type(e).__name__}"

    async def close(self) -> None:
        await self.session.close()


def _key_exhausted(headers: Any) -> bool:
    """The gateway's per-key rate limiter answered (its `x-ratelimit-remaining: 0`), not the server."""
    return any(str(k).lower() == "x-ratelimit-remaining" and str(v).strip() == "0" for k, v in headers)


SENDERS = {"grpc": GrpcSender, "rest": RestSender, "rest_aiohttp": AiohttpRestSender, "oip": OipSender}


# ---------------------------------------------------------------- the worker

@dataclass
class WorkerJob:
    """One worker process's share of the schedule."""

    targets: list[Target]
    times: np.ndarray  # intended send times of this worker's arrivals (s from start)
    choices: np.ndarray  # index into targets per arrival
    timeout_s: float
    max_in_flight: int
    worker: int


async def _work(job: WorkerJob, conn: Any) -> tuple[np.ndarray, list[str], float]:
    """Open the senders, wait for the common start, send on schedule; returns the records, the status names
    and the CPU seconds this process spent from the start to its last answer."""
    counts = np.bincount(job.choices, minlength=len(job.targets)) if len(job.choices) else [0] * len(job.targets)
    senders = []
    for k, t in enumerate(job.targets):
        p = t.payloads or Payloads(t.model)
        p = Payloads(p.source, p.repeat_fraction, p.seed * 1000 + job.worker, p.pool)
        senders.append(SENDERS[t.kind](t, input_sequence(p, t.model, max(1, int(counts[k]))), job.timeout_s))
    for s in senders:
        await s.open()
        for _ in range(2):  # connect (and let the gateway verify a token) before the clock starts; not recorded
            await s.send()
        s.i = 0
    conn.send("ready")  # payloads built, channels open: the parent fixes the common start time
    start_wall = conn.recv()
    n = len(job.times)
    # record columns: intended, start, end (s from t0), target index, status index
    rec = np.full((n, 5), np.nan)
    statuses: list[str] = ["ok"]
    index = {"ok": 0}
    in_flight = 0
    mono0 = time.monotonic() + (start_wall - time.time())
    cpu0 = time.process_time()

    async def one(i: int, k: int) -> None:
        nonlocal in_flight
        rec[i, 1] = time.monotonic() - mono0
        try:
            status = await senders[k].send()
        except Exception as e:  # an unexpected client failure is an outcome too, never a lost record
            status = f"client_{type(e).__name__}"
        rec[i, 2] = time.monotonic() - mono0
        if status not in index:
            index[status] = len(statuses)
            statuses.append(status)
        rec[i, 4] = index[status]
        in_flight -= 1

    tasks = set()
    for i in range(n):
        k = int(job.choices[i])
        rec[i, 0], rec[i, 3] = job.times[i], k
        delay = job.times[i] - (time.monotonic() - mono0)
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= job.max_in_flight:
            if DROPPED not in index:
                index[DROPPED] = len(statuses)
                statuses.append(DROPPED)
            rec[i, 4] = index[DROPPED]
            continue
        in_flight += 1
        task = asyncio.create_task(one(i, k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    cpu_s = time.process_time() - cpu0
    for s in senders:
        await s.close()
    return rec, statuses, cpu_s


def _worker_main(job: WorkerJob, conn: Any) -> None:
    """A worker process: (records, statuses, error, CPU seconds) back through `conn`."""
    try:
        rec, statuses, cpu_s = asyncio.run(_work(job, conn))
        conn.send((rec, statuses, None, cpu_s))
    except Exception as e:  # the parent reports it; a worker must never hang the run
        conn.send((None, None, f"{type(e).__name__}: {e}", 0.0))
    finally:
        conn.close()


# ---------------------------------------------------------------- the public API

def _percentile(a: np.ndarray, q: float) -> float | None:
    """The q-th percentile without interpolating below an observed value (numpy's "higher" method), so that
    1 % of requests at 5 s puts p99 at 5 s, not somewhere between the fast answers and the slow ones."""
    return float(np.percentile(a, q, method="higher")) if len(a) else None


def _member(status: np.ndarray, names: frozenset[str]) -> np.ndarray:
    return np.fromiter((s in names for s in status), bool, len(status))


@dataclass
class Result:
    """Per-request records of a run. Times in seconds from the run's start; latency from the intended time.

    Every request has an outcome in `status`: "ok", a refusal (REFUSALS), a timeout (TIMEOUTS), another
    error, or never sent (NOT_SENT: the generator's in-flight cap, or a failed worker)."""

    targets: list[str]
    intended: np.ndarray
    start: np.ndarray
    end: np.ndarray
    target: np.ndarray
    status: np.ndarray  # str per request
    duration_s: float
    offered_rate: float
    start_wall: float  # time.time() of t = 0
    errors: list[str] = field(default_factory=list)
    timeout_s: float = 5.0
    generator_cpu_s: float = 0.0  # CPU seconds of the worker processes, from the start to their last answer

    @property
    def latency(self) -> np.ndarray:
        """end - intended (NaN for a request that has no answer)."""
        return self.end - self.intended

    @property
    def outcome_latency(self) -> np.ndarray:
        """What every request cost its caller, for the percentiles: end - intended when it was answered (ok,
        refused, error or timed out), the timeout when it never was (not sent, or its worker failed)."""
        lat = self.end - self.intended
        return np.where(np.isfinite(lat), lat, self.timeout_s)

    @property
    def lag(self) -> np.ndarray:
        return self.start - self.intended

    def select(self, target: str | None = None) -> np.ndarray:
        return np.ones(len(self.intended), bool) if target is None else (self.target == self.targets.index(target))

    def summary(self, target: str | None = None, window: tuple[float, float] | None = None,
                slo_ms: float | None = None) -> dict[str, Any]:
        """Figures of the requests intended in `window` (default: the schedule), one target or all.

        Latency percentiles (`p50_ms` ... `max_ms`) count **every** request (`outcome_latency`); `ok_p*`
        are the successes alone, `refusal_p*` the refusals alone. Rates: `offered_rps` over the window;
        `achieved_rps` (ok answers), `completed_rps` (any answer) and `goodput_rps` (ok within `slo_ms`)
        over the completion window, from the window's start to its end or to the last answer, whichever is
        later, so a server that clears its backlog late does not report the full rate."""
        sel = self.select(target)
        w0, w1 = window if window is not None else (0.0, self.duration_s)
        if window is not None:
            sel &= (self.intended >= w0) & (self.intended < w1)
        n = int(sel.sum())
        st = self.status[sel]
        lat = self.outcome_latency[sel] * 1000
        end = self.end[sel]
        ok = st == "ok"
        refused, timed_out, not_sent = _member(st, REFUSALS), _member(st, TIMEOUTS), _member(st, NOT_SENT)
        answered = np.isfinite(end)
        last = float(end[answered].max()) if answered.any() else w1
        span = max(w1, last) - w0
        good = ok & (lat <= slo_ms) if slo_ms is not None else ok
        sent = sel & ~_member(self.status, NOT_SENT)
        lag = self.lag[sent] * 1000
        errors: dict[str, int] = {}
        for s in st[~ok]:
            errors[str(s)] = errors.get(str(s), 0) + 1

        def rate(count: int, over: float) -> float:
            return float(count / over) if over > 0 else 0.0

        return {
            "requests": n, "ok": int(ok.sum()), "errors": errors, "error_count": int(n - ok.sum()),
            "refused": int(refused.sum()), "timeouts": int(timed_out.sum()), "not_sent": int(not_sent.sum()),
            "failed": int((~ok & ~refused & ~timed_out & ~not_sent).sum()),
            "offered_rps": rate(n, w1 - w0), "achieved_rps": rate(int(ok.sum()), span),
            "completed_rps": rate(int(answered.sum()), span), "goodput_rps": rate(int(good.sum()), span),
            "good": int(good.sum()), "slo_ms": slo_ms, "completion_window_s": span,
            "p50_ms": _percentile(lat, 50), "p95_ms": _percentile(lat, 95), "p99_ms": _percentile(lat, 99),
            "max_ms": _percentile(lat, 100), "mean_ms": float(lat.mean()) if n else None,
            "ok_p50_ms": _percentile(lat[ok], 50), "ok_p99_ms": _percentile(lat[ok], 99),
            "refusal_p50_ms": _percentile(lat[refused], 50), "refusal_p99_ms": _percentile(lat[refused], 99),
            "refusal_max_ms": _percentile(lat[refused], 100),
            "send_lag_p50_ms": _percentile(lag, 50), "send_lag_p99_ms": _percentile(lag, 99),
            "send_lag_max_ms": _percentile(lag, 100),
        }

    def timeline(self, bin_s: float = 1.0, slo_ms: float | None = None) -> list[dict[str, Any]]:
        """Per time bin, until the last answer: `offered_rps` and the latency percentiles (every request) of the
        requests *intended* in the bin; `achieved_rps` (ok), `goodput_rps` (ok within `slo_ms`), `refused_rps`,
        `timeouts_rps` and `failed_rps` of the answers that *arrived* in the bin; `errors` = non-ok requests
        intended in the bin."""
        lat = self.outcome_latency * 1000
        answered = np.isfinite(self.end)
        last = float(self.end[answered].max()) if answered.any() else 0.0
        ok = self.status == "ok"
        refused, timed_out = _member(self.status, REFUSALS), _member(self.status, TIMEOUTS)
        good = ok & (lat <= slo_ms) if slo_ms is not None else ok
        out = []
        for b in range(math.ceil(max(self.duration_s, last) / bin_s - 1e-9)):
            lo, hi = b * bin_s, (b + 1) * bin_s
            sent_in = (self.intended >= lo) & (self.intended < hi)
            done_in = answered & (self.end >= lo) & (self.end < hi)
            lag = self.lag[sent_in & np.isfinite(self.start)] * 1000
            out.append({
                "t": lo, "offered_rps": float(sent_in.sum() / bin_s),
                "achieved_rps": float((done_in & ok).sum() / bin_s),
                "goodput_rps": float((done_in & good).sum() / bin_s),
                "refused_rps": float((done_in & refused).sum() / bin_s),
                "timeouts_rps": float((done_in & timed_out).sum() / bin_s),
                "failed_rps": float((done_in & ~ok & ~refused & ~timed_out).sum() / bin_s),
                "p50_ms": _percentile(lat[sent_in], 50), "p99_ms": _percentile(lat[sent_in], 99),
                "errors": int((sent_in & ~ok).sum()), "send_lag_p99_ms": _percentile(lag, 99)})
        return out


RESULT_MARGIN_S = 30.0
"""How long after the schedule's end plus the timeout a worker may take to send its records."""


def run(targets: list[Target], phases: list[Phase], *, processes: int = 2, timeout_s: float = 5.0,
        max_in_flight: int = 10_000, seed: int = 0, on_start: Callable[[], None] | None = None,
        result_margin_s: float = RESULT_MARGIN_S) -> Result:
    """Offer the `phases` schedule across `targets` (by weight) from `processes` worker processes.

    `on_start` is called once every worker is ready, just before the common start (e.g. to read the servers'
    CPU time). Blocks for the schedule's length plus the last answers (at most `timeout_s`); a worker that
    has sent nothing `result_margin_s` after that is killed and its requests are `generator_error`."""
    times = arrivals(phases)
    weights = np.array([t.weight for t in targets], float)
    choices = np.random.default_rng(seed).choice(len(targets), size=len(times), p=weights / weights.sum())
    processes = max(1, min(processes, len(times) or 1))
    ctx = mp.get_context("spawn")
    jobs, pipes = [], []
    for w in range(processes):
        idx = np.arange(w, len(times), processes)
        job = WorkerJob(targets, times[idx], choices[idx], timeout_s, max_in_flight // processes, w)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(job, child), daemon=True)
        proc.start()
        child.close()
        jobs.append((idx, proc))
        pipes.append(parent)
    try:
        for (_, proc), pipe in zip(jobs, pipes, strict=True):
            if not pipe.poll(120):
                raise RuntimeError(f"load generator worker {proc.pid} not ready after 120 s")
            try:
                msg = pipe.recv()
            except EOFError:
                msg = (None, None, "exited before it was ready", 0.0)
            if msg != "ready":
                raise RuntimeError(f"load generator worker failed: {msg[2]}")
    except BaseException:
        for _, proc in jobs:
            proc.kill()
        raise
    if on_start is not None:
        on_start()
    start_wall = time.time() + 0.1
    for pipe in pipes:
        pipe.send(start_wall)
    duration = sum(p.duration_s for p in phases)
    deadline = time.monotonic() + 0.1 + duration + timeout_s + result_margin_s
    n = len(times)
    intended, start, end = times.copy(), np.full(n, np.nan), np.full(n, np.nan)
    target_idx = choices.copy()
    status = np.array([DROPPED] * n, dtype=object)
    errors, cpu = [], 0.0
    for (idx, proc), pipe in zip(jobs, pipes, strict=True):
        rec = statuses = None
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            err = (f"worker {proc.pid} sent no records {result_margin_s:g} s after the schedule's end plus the "
                   f"timeout (stuck): killed, its {len(idx)} requests counted as {GENERATOR_ERROR}")
            proc.kill()
        else:
            try:
                rec, statuses, err, cpu_s = pipe.recv()
                cpu += cpu_s
            except EOFError:
                err = f"worker {proc.pid} died"
        proc.join(5)
        if err or rec is None:
            errors.append(err or f"worker {proc.pid}: no records")
            status[idx] = GENERATOR_ERROR
            continue
        start[idx], end[idx] = rec[:, 1], rec[:, 2]
        status[idx] = np.array([statuses[int(s)] for s in rec[:, 4]], dtype=object)
    offered = n / duration if duration else 0.0
    return Result([t.name for t in targets], intended, start, end, target_idx, status, duration, offered,
                  start_wall, errors, timeout_s, cpu)


def worker_processes(rate: float) -> int:
    """How many generator processes a rate needs: one per ~400 req/s, at most the CPU count."""
    return max(1, min(os.cpu_count() or 1, math.ceil(rate / 400)))
