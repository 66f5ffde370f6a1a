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
token in metadata), REST `POST /api/v1/<model>` (aiohttp, a pool of tokens rotated per request,
so a pool of >= 0.6 * rate distinct standard-tier keys stays under the gateway's 100 req/min per
key) and the Open Inference Protocol v2 (`ModelInfer`, gRPC). Payloads are built in the worker
from a picklable `Payloads` description.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"

# Status values of a record besides "ok": gRPC status names (lower case) or "http_<code>".
DROPPED = "dropped"  # never sent: the generator had max_in_flight outstanding requests
TIMEOUT = "timeout"


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


def input_sequence(p: Payloads, model: str, n: int) -> list[Any]:
    """The inputs of `n` consecutive requests: distinct ones, with `repeat_fraction` repeats of earlier ones."""
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
    """Typed `<model>.v1.<Model>Service/Predict` over one grpc.aio channel per worker."""

    async def open(self) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(self.target.address)
        model = self.target.model
        self.pb = __import__(f"{model}.v1.{model}_pb2", fromlist=["x"])
        rpc = __import__(f"{model}.v1.{model}_pb2_grpc", fromlist=["x"])
        self.stub = getattr(rpc, f"{model.capitalize()}ServiceStub")(self.channel)

    def request(self, x: Any) -> Any:
        m = self.target.model
        if m == "fraud":
            return self.pb.PredictRequest(transaction=self.pb.Transaction(features=x))
        if m == "cnn":
            return self.pb.PredictRequest(image=x)
        return self.pb.PredictRequest(text=x)

    async def send(self) -> str:
        req = self.request(self.next_input())
        token = self.next_token()
        md = (("authorization", f"Bearer {token}"),) if token else None
        try:
            await self.stub.Predict(req, timeout=self.timeout_s, metadata=md)
            return "ok"
        except self.grpc.aio.AioRpcError as e:
            code = e.code()
            return TIMEOUT if code == self.grpc.StatusCode.DEADLINE_EXCEEDED else code.name.lower()

    async def close(self) -> None:
        await self.channel.close()


class OipSender(GrpcSender):
    """Open Inference Protocol v2 `ModelInfer` (the generated `inference` stubs; worker process only)."""

    async def open(self) -> None:
        import grpc
        from inference import grpc_service_pb2 as pb
        from inference import grpc_service_pb2_grpc as rpc

        self.grpc, self.pb = grpc, pb
        self.channel = grpc.aio.insecure_channel(self.target.address)
        self.stub = rpc.GRPCInferenceServiceStub(self.channel)
        self.stub.Predict = self.stub.ModelInfer  # type: ignore[attr-defined]

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


class RestSender(Sender):
    """`POST /api/v1/<model>` with JSON, one aiohttp session per worker: keep-alive pool of at most 256
    connections (a request waiting for a free connection still counts its wait in its latency)."""

    async def open(self) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self.url = f"http://{self.target.address}/api/v1/{self.target.model}"

    def body(self, x: Any) -> bytes:
        m = self.target.model
        if m == "fraud":
            return json.dumps({"transaction": {"features": x}}).encode()
        if m == "cnn":
            return json.dumps({"image": base64.b64encode(x).decode()}).encode()
        return json.dumps({"text": x}).encode()

    async def send(self) -> str:
        headers = {"content-type": "application/json"}
        token = self.next_token()
        if token:
            headers["authorization"] = f"Bearer {token}"
        try:
            async with self.session.post(self.url, data=self.body(self.next_input()), headers=headers) as resp:
                await resp.read()
                return "ok" if resp.status == 200 else f"http_{resp.status}"
        except TimeoutError:
            return TIMEOUT
        except self.aiohttp.ClientError as e:
            return f"client_{type(e).__name__}"

    async def close(self) -> None:
        await self.session.close()


SENDERS = {"grpc": GrpcSender, "rest": RestSender, "oip": OipSender}


# ---------------------------------------------------------------- the worker

@dataclass
class WorkerJob:
    targets: list[Target]
    times: np.ndarray  # intended send times of this worker's arrivals (s from start)
    choices: np.ndarray  # index into targets per arrival
    timeout_s: float
    max_in_flight: int
    worker: int


async def _work(job: WorkerJob, conn: Any) -> tuple[np.ndarray, list[str]]:
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
    in_flight = 0
    mono0 = time.monotonic() + (start_wall - time.time())

    async def one(i: int, k: int) -> None:
        nonlocal in_flight
        rec[i, 1] = time.monotonic() - mono0
        try:
            status = await senders[k].send()
        except Exception as e:  # an unexpected client failure is an outcome too, never a lost record
            status = f"client_{type(e).__name__}"
        rec[i, 2] = time.monotonic() - mono0
        if status not in statuses:
            statuses.append(status)
        rec[i, 4] = statuses.index(status)
        in_flight -= 1

    tasks = set()
    for i in range(n):
        k = int(job.choices[i])
        rec[i, 0], rec[i, 3] = job.times[i], k
        delay = job.times[i] - (time.monotonic() - mono0)
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= job.max_in_flight:
            if DROPPED not in statuses:
                statuses.append(DROPPED)
            rec[i, 4] = statuses.index(DROPPED)
            continue
        in_flight += 1
        task = asyncio.create_task(one(i, k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    for s in senders:
        await s.close()
    return rec, statuses


def _worker_main(job: WorkerJob, conn: Any) -> None:
    try:
        rec, statuses = asyncio.run(_work(job, conn))
        conn.send((rec, statuses, None))
    except Exception as e:  # the parent reports it; a worker must never hang the run
        conn.send((None, None, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


# ---------------------------------------------------------------- the public API

@dataclass
class Result:
    """Per-request records of a run. Times in seconds from the run's start; latency from the intended time."""

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

    @property
    def latency(self) -> np.ndarray:
        return self.end - self.intended

    @property
    def lag(self) -> np.ndarray:
        return self.start - self.intended

    def select(self, target: str | None = None) -> np.ndarray:
        return np.ones(len(self.intended), bool) if target is None else (self.target == self.targets.index(target))

    def summary(self, target: str | None = None, window: tuple[float, float] | None = None) -> dict[str, Any]:
        """Offered and achieved rate, latency percentiles of successful requests (ms), errors by status,
        the generator's own send lag."""
        sel = self.select(target)
        if window is not None:
            sel &= (self.intended >= window[0]) & (self.intended < window[1])
        span = (window[1] - window[0]) if window else self.duration_s
        ok = sel & (self.status == "ok")
        lat = self.latency[ok] * 1000
        sent = sel & (self.status != DROPPED)
        lag = self.lag[sent] * 1000
        errors: dict[str, int] = {}
        for s in self.status[sel & ~(self.status == "ok")]:
            errors[str(s)] = errors.get(str(s), 0) + 1

        def pct(a: np.ndarray, q: float) -> float | None:
            return float(np.percentile(a, q)) if len(a) else None

        return {
            "requests": int(sel.sum()), "ok": int(ok.sum()), "errors": errors,
            "error_count": int(sel.sum() - ok.sum()),
            "offered_rps": float(sel.sum() / span) if span else 0.0,
            "achieved_rps": float(ok.sum() / span) if span else 0.0,
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "max_ms": pct(lat, 100), "mean_ms": float(lat.mean()) if len(lat) else None,
            "send_lag_p50_ms": pct(lag, 50), "send_lag_p99_ms": pct(lag, 99),
            "send_lag_max_ms": pct(lag, 100),
        }

    def timeline(self, bin_s: float = 1.0) -> list[dict[str, Any]]:
        """Per time bin (by intended time): offered and ok counts per second, p50/p99 of successes, errors."""
        out = []
        for b in range(math.ceil(self.duration_s / bin_s)):
            s = self.summary(window=(b * bin_s, (b + 1) * bin_s))
            out.append({"t": b * bin_s, "offered_rps": s["offered_rps"], "achieved_rps": s["achieved_rps"],
                        "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": s["error_count"],
                        "send_lag_p99_ms": s["send_lag_p99_ms"]})
        return out


def run(targets: list[Target], phases: list[Phase], *, processes: int = 2, timeout_s: float = 5.0,
        max_in_flight: int = 10_000, seed: int = 0) -> Result:
    """Offer the `phases` schedule across `targets` (by weight) from `processes` worker processes.

    Blocks for the schedule's length plus the last answers (at most `timeout_s`)."""
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
    for (_, proc), pipe in zip(jobs, pipes, strict=True):
        if not pipe.poll(120):
            raise RuntimeError(f"load generator worker {proc.pid} not ready after 120 s")
        try:
            msg = pipe.recv()
        except EOFError:
            msg = (None, None, "exited before it was ready")
        if msg != "ready":
            raise RuntimeError(f"load generator worker failed: {msg[2]}")
    start_wall = time.time() + 0.1
    for pipe in pipes:
        pipe.send(start_wall)
    n = len(times)
    intended, start, end = times.copy(), np.full(n, np.nan), np.full(n, np.nan)
    target_idx = choices.copy()
    status = np.array(["dropped"] * n, dtype=object)
    errors = []
    for (idx, proc), pipe in zip(jobs, pipes, strict=True):
        try:
            rec, statuses, err = pipe.recv()
        except EOFError:
            rec, statuses, err = None, None, f"worker {proc.pid} died"
        proc.join(30)
        if err:
            errors.append(err)
            status[idx] = "generator_error"
            continue
        start[idx], end[idx] = rec[:, 1], rec[:, 2]
        status[idx] = np.array([statuses[int(s)] for s in rec[:, 4]], dtype=object)
    duration = sum(p.duration_s for p in phases)
    offered = n / duration if duration else 0.0
    return Result([t.name for t in targets], intended, start, end, target_idx, status, duration, offered,
                  start_wall, errors)


def worker_processes(rate: float) -> int:
    """How many generator processes a rate needs: one per ~400 req/s, at most the CPU count."""
    return max(1, min(os.cpu_count() or 1, math.ceil(rate / 400)))
