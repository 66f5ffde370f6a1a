"""The chaos scenarios: each injects one fault into the running `Platform` while `Traffic` runs, and returns a
`ScenarioResult`. `drill` is the common shape: steady traffic, `pre_s` of healthy baseline, the fault, its
clearing, `post_s` of recovery; the answers checked by the `Verifier` throughout."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.stack import scrape, tokens, total
from chaos.platform import ROOT, Platform
from chaos.report import ScenarioResult, Window, recovery_time
from chaos.traffic import Traffic, Verifier
from mlplatform import faults


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] chaos: {msg}", flush=True)


@dataclass
class Context:
    """What every scenario gets: the platform, the steady rate (req/s of the mix), the answer checker, the
    run's directory, and `scale` (1.0; < 1 shortens every phase for a quick run)."""

    platform: Platform
    rate: float
    verifier: Verifier
    out: Path
    scale: float = 1.0
    mix: dict[str, float] | None = None
    """The steady traffic's mix (default chaos.traffic.MIX)."""

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.platform.gateway_port}"

    def s(self, seconds: float) -> float:
        """A phase's length at this run's scale (never under 3 s)."""
        return max(3.0, seconds * self.scale)


def _summarise(result: ScenarioResult, res: loadgen.Result, window: Window, bin_s: float = 1.0) -> None:
    """Fill `result` from the traffic's records and the fault's window."""
    s = res.summary()
    result.requests = s["requests"]
    result.outcomes = {"ok": s["ok"], **s["errors"]}
    result.max_ms = s["max_ms"]
    p99s = []
    for target in res.targets:
        t = res.summary(target)
        result.by_target[target] = {"ok": t["ok"], **t["errors"]}
        phases = [res.summary(target, window=w)["p99_ms"] for w in (
            (0.0, max(window.start_s, 0.001)), (window.start_s, max(window.end_s, window.start_s + bin_s)),
            (window.end_s, res.duration_s))]
        p99s.append(f"{target} " + " / ".join("-" if v is None else f"{v:.0f}" for v in phases))
    result.extra["p99 ms per target (before / during / after)"] = "; ".join(p99s)
    before = res.summary(window=(0.0, max(window.start_s, 0.001)))
    during = res.summary(window=(window.start_s, max(window.end_s, window.start_s + bin_s)))
    after = res.summary(window=(window.end_s, res.duration_s))
    result.p99_ms_before, result.p99_ms_during, result.p99_ms_after = (
        before["p99_ms"], during["p99_ms"], after["p99_ms"])
    result.fault_window = window
    timeline = res.timeline(bin_s)
    result.recovery_s = recovery_time(timeline, window.end_s, bin_s, before["p99_ms"])
    result.timeline = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in b.items()} for b in timeline]
    if res.errors:
        result.notes += [f"load generator: {e}" for e in res.errors]


def drill(ctx: Context, result: ScenarioResult, *, pre_s: float, hold_s: float, post_s: float,
          inject: Callable[[], Any], clear: Callable[[], Any] | None = None,
          during: Callable[[], Any] | None = None, mix: dict[str, float] | None = None,
          rate: float | None = None) -> ScenarioResult:
    """Traffic for pre_s + hold_s + post_s: `inject()` at pre_s, `during()` (if any) right after it, `clear()` at
    pre_s + hold_s (or once `during` returns, if later). The fault's window is from inject to the end of clear, or
    to the end of inject for an instant fault (no hold, no clear: a signal, a hot restart)."""
    pre_s, hold_s, post_s = ctx.s(pre_s), ctx.s(hold_s) if hold_s else 0.0, ctx.s(post_s)
    log(f"{result.name}: {result.fault}")
    try:
        traffic = Traffic(ctx.gateway, rate or ctx.rate, pre_s + hold_s + post_s, result.name, mix or ctx.mix).start()
        traffic.wait_started()
        ctx.verifier.start()
        try:
            traffic.sleep_until(pre_s)
            t0 = traffic.now()
            inject()
            t1 = traffic.now()  # an instant fault (a signal, a restart): its window ends once it is done
            if during is not None:
                during()
            if hold_s or clear is not None:
                traffic.sleep_until(t0 + hold_s)
                if clear is not None:
                    clear()
                t1 = traffic.now()
        finally:
            res = traffic.join()
            result.checks = ctx.verifier.stop()
        _summarise(result, res, Window(round(t0, 2), round(t1, 2)))
    except Exception as exc:  # the scenario is reported as failed; the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"{result.name}: ERROR {result.error}")
    _, why = result.verdict()
    log(f"{result.name}: {result.requests} requests, failures {result.failures or 0}, recovery "
        f"{result.recovery_s} s, verdict: {why}")
    if not ctx.platform.wait_all_healthy(90):
        log(f"{result.name}: not every replica healthy 90 s after the scenario")
        result.notes.append("not every replica was healthy again 90 s after the scenario")
    return result


def _each_service_replica(ctx: Context, slot: int = 0) -> list[str]:
    return [f"{name}[{slot}]" if slot else name for name in ctx.platform.stack.groups]


def _restarts(ctx: Context) -> dict[str, int]:
    return {proc.name: proc.restarts for g in ctx.platform.stack.groups.values() for proc in g.slots if proc}


def _wait_restarted(ctx: Context, before: dict[str, int], names: list[str], timeout: float) -> float | None:
    """Seconds until every named replica has been restarted by the supervisor and is healthy in the gateway."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        now = _restarts(ctx)
        if all(now.get(n, 0) > before.get(n, 0) for n in names) and ctx.platform.wait_all_healthy(0.5):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.2)
    return None


# ---------------------------------------------------------------- replicas

def replica_kill(ctx: Context) -> ScenarioResult:
    r = ScenarioResult("replica_kill", "SIGKILL replica 0 of every service (fraud, cnn, sentiment) at once",
                       "a crash loses no request while the other replica is healthy: the gateway retries calls "
                       "reset or refused by the dead replica on the other one, and the supervisor restarts it",
                       "no_failure", recovery_target_s=10)
    names = _each_service_replica(ctx)
    before: dict[str, int] = {}
    restarted: dict[str, Any] = {}

    def inject() -> None:
        before.update(_restarts(ctx))
        for name in ctx.platform.stack.groups:
            os.kill(ctx.platform.replica(name, 0).pid, signal.SIGKILL)

    def clear() -> None:
        restarted["s"] = _wait_restarted(ctx, before, names, 60)

    drill(ctx, r, pre_s=10, hold_s=0, post_s=30, inject=inject, during=clear)
    r.extra["replicas restarted and healthy in the gateway after"] = f"{restarted.get('s')} s"
    r.notes.append("The fault's window ends when the SIGKILL is sent; recovery is measured from there.")
    return r


def replica_hang(ctx: Context) -> ScenarioResult:
    hang = 10.0
    r = ScenarioResult("replica_hang", f"SIGSTOP replica 0 of every service for {hang:g} s (a hang, not a crash), "
                       "then SIGCONT", "a hung replica costs latency, not failures: calls stuck on it are retried "
                       "elsewhere after the gateway's per-try timeout, the health check takes it out of rotation",
                       "no_failure", recovery_target_s=10)
    pids: list[int] = []

    def inject() -> None:
        pids[:] = [ctx.platform.replica(name, 0).pid for name in ctx.platform.stack.groups]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)

    def clear() -> None:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    return drill(ctx, r, pre_s=10, hold_s=hang, post_s=20, inject=inject, clear=clear)


def replica_restart(ctx: Context) -> ScenarioResult:
    r = ScenarioResult("replica_restart", "SIGTERM replica 0 of every service (graceful stop: NOT_SERVING, drain), "
                       "restarted by the supervisor", "a restart loses no request: the replica drains before it stops",
                       "no_failure", recovery_target_s=10)
    names = _each_service_replica(ctx)
    before: dict[str, int] = {}
    restarted: dict[str, Any] = {}

    def inject() -> None:
        before.update(_restarts(ctx))
        for name in ctx.platform.stack.groups:
            ctx.platform.replica(name, 0).signal(signal.SIGTERM)

    def clear() -> None:
        restarted["s"] = _wait_restarted(ctx, before, names, 90)

    drill(ctx, r, pre_s=10, hold_s=0, post_s=30, inject=inject, during=clear)
    r.extra["replicas restarted and healthy in the gateway after"] = f"{restarted.get('s')} s"
    return r


# ---------------------------------------------------------------- Redis

def _write_behind(ctx: Context) -> dict[str, float]:
    """Audit / card-update write-behind counters summed over fraud's replicas (written, dropped, failed)."""
    out = {"written": 0.0, "dropped": 0.0, "failed": 0.0}
    for port in ctx.platform.metrics_ports().get("fraud", []):
        try:
            import urllib.request
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            for k in out:
                if line.startswith(f"write_behind_{k}_total{{"):
                    out[k] += float(line.rsplit(" ", 1)[1])
    return out


def redis_kill(ctx: Context) -> ScenarioResult:
    down = 10.0
    r = ScenarioResult("redis_kill", f"SIGKILL Redis for {down:g} s, then a fresh (empty) Redis on the same port and "
                       "the cards materialised again", "the feature store and the cache are optional on the request "
                       "path: fraud answers with flagged defaults (feature_source store_unavailable) and the "
                       "services skip the cache", "no_failure", recovery_target_s=10)
    facts: dict[str, Any] = {}

    def inject() -> None:
        facts["keys_before"] = ctx.platform.redis_cli("DBSIZE")
        facts["audit_before"] = ctx.platform.redis_cli("XLEN", "fraud:audit")
        facts["wb_before"] = _write_behind(ctx)
        ctx.platform.kill_redis()

    def clear() -> None:
        ctx.platform.restart_redis()
        facts["keys_after_restart"] = ctx.platform.redis_cli("DBSIZE")
        t0 = time.monotonic()
        ctx.platform.stack.materialize_features()
        facts["materialize_s"] = round(time.monotonic() - t0, 1)

    drill(ctx, r, pre_s=10, hold_s=down, post_s=20, inject=inject, clear=clear)
    wb = _write_behind(ctx)
    lost = {k: wb[k] - facts.get("wb_before", {}).get(k, 0.0) for k in ("dropped", "failed")}
    r.data_lost = (f"Redis's contents ({facts.get('keys_before')} keys, {facts.get('audit_before')} audit entries: no "
                   f"persistence, as in make run); write-behind items dropped {lost['dropped']:.0f}, failed "
                   f"{lost['failed']:.0f}")
    r.extra["keys after the restart / after materialising again"] = (
        f"{facts.get('keys_after_restart')} / {ctx.platform.redis_cli('DBSIZE')} "
        f"(materialise took {facts.get('materialize_s')} s)")
    return r


def redis_slow(ctx: Context) -> ScenarioResult:
    delay, hold = 200.0, 20.0
    r = ScenarioResult("redis_slow", f"+{delay:g} ms on every Redis read and write (delaying TCP proxy) for {hold:g} s",
                       "a slow Redis cannot hold the request path: feature reads and cache lookups are bounded "
                       "(REDIS_TIMEOUT_MS, the breaker) and fall back to flagged defaults / no cache",
                       "no_failure", recovery_target_s=10)
    wb: dict[str, Any] = {}

    def inject() -> None:
        wb["before"] = _write_behind(ctx)
        ctx.platform.proxy.set_delay(delay)

    def clear() -> None:
        ctx.platform.proxy.set_delay(0)

    drill(ctx, r, pre_s=10, hold_s=hold, post_s=20, inject=inject, clear=clear)
    after = _write_behind(ctx)
    lost = {k: after[k] - wb.get("before", {}).get(k, 0.0) for k in ("dropped", "failed")}
    r.data_lost = f"write-behind items dropped {lost['dropped']:.0f}, failed {lost['failed']:.0f}"
    return r


# ---------------------------------------------------------------- the model

def _set_fault(ctx: Context, model: str, fault: faults.Fault) -> None:
    faults.set_fault(ctx.platform.faults_file, model, fault)


def model_errors(ctx: Context) -> ScenarioResult:
    hold = 20.0
    r = ScenarioResult("model_errors", f"fraud's and cnn's runtime raise on every call for {hold:g} s "
                       "(mlplatform.faults error_rate 1)", "a failing model opens its breaker: fraud answers from "
                       "its rule-based fallback (flagged `fallback`), cnn (no fallback) refuses with UNAVAILABLE / "
                       "503; both recover when the breaker's half-open probe succeeds",
                       "no_failure", recovery_target_s=15,
                       expect_by_target={"cnn/grpc": "refusals_only"})

    def inject() -> None:
        until = time.time() + ctx.s(hold)
        for model in ("fraud", "cnn"):
            _set_fault(ctx, model, faults.Fault(error_rate=1.0, until=until))

    def clear() -> None:
        faults.clear(ctx.platform.faults_file)

    drill(ctx, r, pre_s=10, hold_s=hold, post_s=25, inject=inject, clear=clear)
    fallbacks = sum(total(scrape(p), "inference_fallback_total", model="fraud")
                    for p in ctx.platform.metrics_ports()["fraud"])
    r.extra["fraud rows answered by the fallback (service counter)"] = f"{fallbacks:.0f}"
    return r


def model_slow(ctx: Context) -> ScenarioResult:
    hold = 20.0
    r = ScenarioResult("model_slow", f"every model's runtime 10x slower for {hold:g} s (delay_factor 10)",
                       "admission control refuses (RESOURCE_EXHAUSTED / 429-503) what cannot be answered within "
                       "the latency budget instead of letting it time out", "refusals_only", recovery_target_s=10)

    def inject() -> None:
        _set_fault(ctx, "*", faults.Fault(delay_factor=10.0, until=time.time() + ctx.s(hold)))

    def clear() -> None:
        faults.clear(ctx.platform.faults_file)

    return drill(ctx, r, pre_s=10, hold_s=hold, post_s=20, inject=inject, clear=clear)


def model_slow_overload(ctx: Context) -> ScenarioResult:
    hold, rate = 20.0, 40.0
    r = ScenarioResult("model_slow_overload", f"sentiment's runtime 10x slower for {hold:g} s while sentiment alone "
                       f"gets {rate:g} req/s (REST): within its capacity when healthy, far beyond it when slowed",
                       "when a slowed model's capacity is exceeded, admission control refuses the excess quickly "
                       "(429) and what it admits is answered within budget: no timeouts, no 5xx",
                       "refusals_only", recovery_target_s=10)

    def inject() -> None:
        _set_fault(ctx, "sentiment", faults.Fault(delay_factor=10.0, until=time.time() + ctx.s(hold)))

    def clear() -> None:
        faults.clear(ctx.platform.faults_file)

    return drill(ctx, r, pre_s=10, hold_s=hold, post_s=20, inject=inject, clear=clear,
                 mix={"sentiment/rest": 1.0}, rate=rate)


# ---------------------------------------------------------------- the gateway

def gateway_hot_restart(ctx: Context) -> ScenarioResult:
    r = ScenarioResult("gateway_hot_restart", "Envoy hot restart (--restart-epoch n+1, same base id) with a changed "
                       "config (the unary route timeout 15 s -> 14 s)", "a gateway config change under load loses "
                       "no request: the new Envoy takes the listening sockets over, the old one drains its "
                       "connections and exits", "no_failure", recovery_target_s=5)
    pids: dict[str, Any] = {}

    def inject() -> None:
        old, new = ctx.platform.hot_restart({"timeouts": {"unary_s": 14}})
        pids.update(old=old, new=new, epoch=ctx.platform.epoch)

    drill(ctx, r, pre_s=10, hold_s=0, post_s=20, inject=inject)
    r.extra["Envoy"] = (f"epoch {pids.get('epoch')}: pid {pids.get('old')} -> {pids.get('new')} (hot restart, not a "
                        "drain-and-replace)")
    return r


# ---------------------------------------------------------------- slow clients

async def _slowloris(host: str, port: int, n: int, first: bytes, drip: bytes, hold_s: float) -> dict[str, Any]:
    """`n` connections that send `first`, then `drip` once a second, never completing a request; how many the
    server closed (and after how long) within `hold_s`."""
    closed: list[float] = []
    t0 = time.monotonic()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            closed.append(0.0)
            return
        try:
            writer.write(first)
            while time.monotonic() - t0 < hold_s:
                try:
                    data = await asyncio.wait_for(reader.read(65536), 1.0)
                    if not data:
                        closed.append(time.monotonic() - t0)
                        return
                except TimeoutError:
                    pass
                writer.write(drip)
                await writer.drain()
        except OSError:
            closed.append(time.monotonic() - t0)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))
    return {"connections": n, "closed_by_server": len(closed),
            "closed_after_s_median": round(float(np.median(closed)), 1) if closed else None}


async def _unread_streams(target: str, n: int, token: str | None, hold_s: float, features: list[float],
                          per_second: float = 2.0) -> dict[str, Any]:
    """`n` fraud StreamPredict bidi streams that each write `per_second` requests a second and never read an
    answer."""
    import grpc
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as rpc

    meta = (("authorization", f"Bearer {token}"),) if token else None
    written = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.FraudServiceStub(channel)
        calls = [stub.StreamPredict(metadata=meta) for _ in range(n)]
        req = pb.PredictRequest(transaction=pb.Transaction(features=features))
        t0 = time.monotonic()

        async def writer(call: Any) -> None:
            nonlocal written
            try:
                while time.monotonic() - t0 < hold_s:
                    await asyncio.wait_for(call.write(req), 1.0)
                    written += 1
                    await asyncio.sleep(1 / per_second)
            except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            try:
                await asyncio.sleep(max(0.0, hold_s - (time.monotonic() - t0)))
            finally:
                call.cancel()

        await asyncio.gather(*(writer(c) for c in calls))
    return {"streams": n, "messages_written_unread": written}


def slow_clients(ctx: Context) -> ScenarioResult:
    hold = 20.0
    r = ScenarioResult("slow_clients", f"for {hold:g} s: 200 slowloris connections to Envoy (request headers, one "
                       "line a second) and 50 to a fraud replica's gRPC port (the HTTP/2 preface, a byte a second), "
                       "plus 20 bidi streams through the gateway and 20 straight to a replica that write 2 "
                       "messages a second and never read",
                       "slow or stuck clients cost the platform file descriptors, not service: everyone else is "
                       "answered", "no_failure", recovery_target_s=5)
    found: dict[str, Any] = {}
    fraud_port = ctx.platform.stack.groups["fraud"].port(0)
    features = json.loads((ctx.platform.repository / "fraud" / "1" / "sample.json").read_text())["rows"][0]["features"]
    token = tokens(1, "chaos-stuck")[0]

    def inject() -> None:
        hold_s = ctx.s(hold)

        async def all_of_them() -> list[Any]:
            return await asyncio.gather(
                _slowloris("127.0.0.1", ctx.platform.gateway_port, 200,
                           b"POST /api/v1/fraud HTTP/1.1\r\nHost: chaos\r\n", b"X-Slow: 1\r\n", hold_s),
                _slowloris("127.0.0.1", fraud_port, 50, b"PRI * HTTP/2.0\r\n", b"\r", hold_s),
                _unread_streams(ctx.gateway, 20, token, hold_s, features),
                _unread_streams(f"127.0.0.1:{fraud_port}", 20, None, hold_s, features),
                return_exceptions=True)

        def run() -> None:
            found["results"] = asyncio.run(all_of_them())

        found["thread"] = threading.Thread(target=run, daemon=True)
        found["thread"].start()

    def clear() -> None:
        found["thread"].join(60)

    drill(ctx, r, pre_s=10, hold_s=hold, post_s=15, inject=inject, clear=clear)
    labels = ("slowloris -> Envoy", "slowloris -> fraud replica", "unread streams -> gateway",
              "unread streams -> fraud replica")
    for label, res in zip(labels, found.get("results") or [], strict=False):
        r.extra[label] = res if not isinstance(res, BaseException) else f"{type(res).__name__}: {res}"
    return r


# ---------------------------------------------------------------- large requests

def _noise_png(limit: int, seed: int) -> bytes:
    """A grayscale PNG of random pixels just under `limit` bytes (incompressible: the largest legal image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = int((limit * 0.97) ** 0.5)
    while True:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
        if buf.tell() <= limit:
            return buf.getvalue()
        side -= 8


def large_bodies(repository: Path) -> list[tuple[str, bytes]]:
    """The largest legal REST requests: (path, JSON body). cnn: one image at its byte limit, and a batch of three
    just under the gateway's 4 MiB body limit; sentiment: 32 texts (its batch limit) of 4,096 characters (its
    text limit); fraud: 256 transactions (its batch limit)."""
    cnn_cfg = json.loads((repository / "cnn" / "1" / "config.json").read_text())
    img_limit = int(cnn_cfg["parameters"]["limits"]["max_image_bytes"]) if "parameters" in cnn_cfg and "limits" in \
        cnn_cfg["parameters"] else 1 << 20
    big = _noise_png(img_limit, 1)
    third = _noise_png(int((4 * 1024 * 1024 - 4096) * 3 / 4 / 3), 2)
    fraud_rows = json.loads((repository / "fraud" / "1" / "sample.json").read_text())["rows"]
    sent_cfg = json.loads((repository / "sentiment" / "1" / "config.json").read_text())
    sent_batch = int(sent_cfg.get("batching", {}).get("max_batch_size", 32))
    fraud_batch = int(json.loads((repository / "fraud" / "1" / "config.json").read_text())
                      .get("batching", {}).get("max_batch_size", 256))
    words = ["the", "parcel", "came", "late", "but", "the", "support", "team", "sorted", "it", "out", "quickly",
             "and", "politely"]
    text = " ".join(words[i % len(words)] for i in range(2000))[:4096]
    b64 = base64.b64encode
    return [
        ("/api/v1/cnn", json.dumps({"image": b64(big).decode(), "top_k": 3}).encode()),
        ("/api/v1/cnn:batch", json.dumps({"inputs": [{"id": str(i), "image": b64(third).decode()}
                                                     for i in range(3)]}).encode()),
        ("/api/v1/sentiment:batch", json.dumps({"texts": [text] * sent_batch}).encode()),
        ("/api/v1/fraud:batch", json.dumps({"transactions": [
            {"transaction_id": f"big-{i}", "features": fraud_rows[i % len(fraud_rows)]["features"]}
            for i in range(fraud_batch)]}).encode()),
    ]


def large_requests(ctx: Context) -> ScenarioResult:
    hold = 15.0
    r = ScenarioResult("large_requests", f"for {hold:g} s, 6 clients in a loop sending the largest legal requests "
                       "(cnn image at its 1 MiB limit, cnn batch of 3 near the gateway's 4 MiB body limit, "
                       "sentiment 32 x 4,096 characters, fraud 256 transactions)",
                       "requests at the limits are served (or refused clearly under load), never break the "
                       "platform or the steady traffic", "refusals_only", recovery_target_s=10)
    bodies = large_bodies(ctx.platform.repository)
    keys = tokens(30, "chaos-large")
    outcome: dict[str, dict[str, int]] = {}
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def client(k: int) -> None:
        import http.client
        i = k
        while not stop.is_set():
            path, body = bodies[i % len(bodies)]
            i += 1
            conn = http.client.HTTPConnection("127.0.0.1", ctx.platform.gateway_port, timeout=30)
            try:
                conn.request("POST", path, body, {"content-type": "application/json",
                                                  "authorization": f"Bearer {keys[i % len(keys)]}"})
                resp = conn.getresponse()
                data = resp.read()
                status = "ok" if resp.status == 200 else f"http_{resp.status}"
                if resp.status == 200 and b'"error"' in data:
                    status = "item_error"  # a batch item refused: not expected for legal items
            except OSError as exc:
                status = f"client_{type(exc).__name__}"
            finally:
                conn.close()
            bucket = outcome.setdefault(path, {})
            bucket[status] = bucket.get(status, 0) + 1

    def inject() -> None:
        threads[:] = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()

    def clear() -> None:
        stop.set()
        for t in threads:
            t.join(40)

    drill(ctx, r, pre_s=10, hold_s=hold, post_s=15, inject=inject, clear=clear)
    for path, body in bodies:
        r.extra[f"large {path} ({len(body) / 1024:.0f} KiB)"] = outcome.get(path, {})
        if outcome.get(path):
            r.by_target[f"large {path}"] = outcome[path]
    return r


# ---------------------------------------------------------------- many streams

def bidi_streams(ctx: Context, n: int = 1000, messages: int = 3) -> ScenarioResult:
    spread_s = ctx.s(10.0)
    r = ScenarioResult("bidi_1000", f"{n} concurrent fraud StreamPredict bidi streams through the gateway (all open "
                       f"at once: opened with one message each over {spread_s:g} s, then {messages - 1} more each over "
                       f"{spread_s:g} s while all are open), on top of the "
                       "steady traffic", "a thousand long-lived streams fit alongside unary traffic: every stream "
                       "message is answered right or clearly refused (an item error RESOURCE_EXHAUSTED), the "
                       "streams themselves never fail", "no_failure", recovery_target_s=10,
                       expect_by_target={"bidi stream messages": "refusals_only"})
    fraud_rows = json.loads((ctx.platform.repository / "fraud" / "1" / "sample.json").read_text())["rows"]
    keys = tokens(max(1, n // 60 + 1), "chaos-bidi")
    found: dict[str, Any] = {}

    async def streams() -> dict[str, Any]:
        import grpc
        from fraud.v1 import fraud_pb2 as pb
        from fraud.v1 import fraud_pb2_grpc as rpc

        channels = [grpc.aio.insecure_channel(ctx.gateway) for _ in range(10)]
        want = {}
        stub0 = rpc.FraudServiceStub(channels[0])
        for i in range(messages):
            reply = await stub0.Predict(pb.PredictRequest(transaction=pb.Transaction(
                features=fraud_rows[i % len(fraud_rows)]["features"])), metadata=(("authorization",
                                                                                  f"Bearer {keys[0]}"),), timeout=30)
            want[i] = reply.prediction.fraud_probability
        opened = asyncio.Event()
        counter: dict[str, Any] = {"open": 0, "ok_messages": 0, "wrong": 0, "errors": {}, "fallback": 0,
                                   "refused": {}, "examples": []}

        async def one(k: int) -> None:
            stub = rpc.FraudServiceStub(channels[k % len(channels)])
            call = stub.StreamPredict(metadata=(("authorization", f"Bearer {keys[k % len(keys)]}"),), timeout=120)
            rng = np.random.default_rng(k)
            try:
                await asyncio.sleep(float(rng.uniform(0, spread_s)))  # the opening messages spread too
                await call.write(pb.PredictRequest(transaction=pb.Transaction(
                    transaction_id=f"s{k}-0", features=fraud_rows[0]["features"])))
                first = await call.read()
                counter["open"] += 1
                results = [first]
                if counter["open"] >= n:
                    opened.set()
                await asyncio.wait_for(opened.wait(), 60 + spread_s)
                for i in range(1, messages):  # spread over `spread_s`: 1000 streams, not a 1000-message burst
                    await asyncio.sleep(float(rng.uniform(0, spread_s / (messages - 1))))
                    await call.write(pb.PredictRequest(transaction=pb.Transaction(
                        transaction_id=f"s{k}-{i}", features=fraud_rows[i % len(fraud_rows)]["features"])))
                    results.append(await call.read())
                await call.done_writing()
                for i, res in enumerate(results):
                    if res.WhichOneof("outcome") == "error" and res.error.code in ("RESOURCE_EXHAUSTED",
                                                                                     "UNAVAILABLE"):
                        code = f"item_{res.error.code.lower()}"  # a clear refusal of that message
                        counter["refused"][code] = counter["refused"].get(code, 0) + 1
                    elif res.WhichOneof("outcome") == "prediction" and res.prediction.fallback:
                        counter["fallback"] += 1
                    elif res.WhichOneof("outcome") == "prediction" and abs(
                            res.prediction.fraud_probability - want[i]) <= 1e-4:
                        counter["ok_messages"] += 1
                    else:
                        counter["wrong"] += 1
                        if len(counter["examples"]) < 3:
                            counter["examples"].append(f"message {i}: {str(res).strip()[:200]} (expected "
                                                       f"fraud_probability {want[i]:.6f})")
            except TimeoutError:
                counter["errors"]["not all open within 60 s"] = counter["errors"].get("not all open within 60 s", 0) + 1
                call.cancel()
            except grpc.aio.AioRpcError as exc:
                name = exc.code().name.lower()
                counter["errors"][name] = counter["errors"].get(name, 0) + 1

        t0 = time.monotonic()
        await asyncio.gather(*(one(k) for k in range(n)))
        counter["seconds"] = round(time.monotonic() - t0, 1)
        for ch in channels:
            await ch.close()
        return counter

    def inject() -> None:
        def run() -> None:
            try:
                found["result"] = asyncio.run(streams())
            except Exception as exc:
                found["result"] = {"error": f"{type(exc).__name__}: {exc}"}

        found["thread"] = threading.Thread(target=run, daemon=True)
        found["thread"].start()

    def clear() -> None:
        found["thread"].join(150)

    drill(ctx, r, pre_s=10, hold_s=2 * spread_s + 2, post_s=20, inject=inject, clear=clear)
    res = found.get("result", {})
    r.extra["streams"] = res
    if res.get("error"):
        r.error = f"streams: {res['error']}"
    r.checks.wrong += int(res.get("wrong", 0))
    answered = res.get("ok_messages", 0) + res.get("fallback", 0) + sum(res.get("refused", {}).values())
    r.by_target["bidi stream messages"] = {"ok": res.get("ok_messages", 0) + res.get("fallback", 0),
                                           **res.get("refused", {}), **res.get("errors", {})}
    if answered + res.get("wrong", 0) < n * messages:
        r.by_target["bidi stream messages"]["unanswered"] = n * messages - answered - res.get("wrong", 0)
    return r


SCENARIOS: dict[str, Callable[[Context], ScenarioResult]] = {
    "replica_kill": replica_kill, "replica_hang": replica_hang, "replica_restart": replica_restart,
    "redis_kill": redis_kill, "redis_slow": redis_slow, "model_errors": model_errors, "model_slow": model_slow,
    "model_slow_overload": model_slow_overload,
    "gateway_hot_restart": gateway_hot_restart, "slow_clients": slow_clients, "large_requests": large_requests,
    "bidi_1000": bidi_streams,
}
"""Every scenario, in the order `make chaos` runs them."""


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except OSError:
        return "?"


def machine() -> str:
    import platform as pf

    import psutil
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {pf.python_version()}, "
            f"{socket.gethostname()}; load average at start {load[0]:.1f} (other work shares the CPUs)")

