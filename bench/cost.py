"""The `cost` scenario (issue 13, item 1): server CPU per request against the gRPC floor, and the gateway's CPU
per call.

Probes, each driven by the same closed-loop client (`closed_loop`, a separate spawned process: N calls in
flight on one grpc.aio channel, requests serialised beforehand and answers left unparsed, so the client stays
cheap and identical for every probe):

  floor      a bare grpc.aio server answering grpc.health.v1.Health/Check (bench/floor_server.py)
  fraud      the fraud service (cache off), typed `fraud.v1.FraudService/Predict`
  fraud_oip  the same process over the Open Inference Protocol `ModelInfer`
  cnn        the cnn service, typed Predict; its overhead = CPU per request - the runtime's own CPU per image
             (measured here in-process at the batch size the service actually formed)

Server CPU per request = the server process's CPU time (user + system, every thread; psutil) over the calls
÷ calls, read just before the client starts its timed calls and just after it finishes. Then the gateway:
fraud REST (and typed gRPC) through Envoy at a steady open-loop rate; Envoy's CPU ÷ answered calls.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen, verdicts
from bench.loadgen import Phase, Target
from bench.stack import Stack, cpu_delta, cpu_seconds, keys_for, log, observed, scrape_all, tokens
from bench.verdicts import fmt
from mlplatform.launch import ServiceProcess

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Probe:
    """One server and method the closed-loop client calls."""

    name: str
    role: str  # the process whose CPU is measured (a Stack role, or "floor")
    method: str
    model: str | None = None  # whose payloads to send (None: an empty Health/Check request)
    kind: str = "grpc"  # "grpc" (typed) or "oip"
    calls_factor: float = 1.0  # fraction of the configured calls (cnn is slower)
    max_serial_calls: int | None = None  # at 1 in flight (cnn's batcher waits for batch-mates: ~25 ms a call)


PROBES = (
    Probe("floor", "floor", HEALTH_CHECK),
    Probe("fraud", "fraud", "/fraud.v1.FraudService/Predict", "fraud"),
    Probe("fraud_oip", "fraud", "/inference.GRPCInferenceService/ModelInfer", "fraud", "oip"),
    Probe("cnn", "cnn", "/cnn.v1.CnnService/Predict", "cnn", calls_factor=0.25, max_serial_calls=500),
)


def payloads(probe: Probe, n: int = 256) -> list[bytes]:
    """Serialised requests for a probe (distinct inputs, reused round-robin)."""
    if probe.model is None:
        return [b""]  # HealthCheckRequest(service="")
    if probe.kind == "oip":
        from inference import grpc_service_pb2 as pb

        out = []
        for x in loadgen.load_inputs(probe.model, n, seed=3):
            req = pb.ModelInferRequest(model_name=probe.model)
            t = req.inputs.add(name="features", datatype="FP32", shape=[1, len(x)])
            t.contents.fp32_contents.extend(x)
            out.append(req.SerializeToString())
        return out
    pb = __import__(f"{probe.model}.v1.{probe.model}_pb2", fromlist=["x"])
    out = []
    for x in loadgen.load_inputs(probe.model, n, seed=3):
        if probe.model == "fraud":
            out.append(pb.PredictRequest(transaction=pb.Transaction(features=x)).SerializeToString())
        elif probe.model == "cnn":
            out.append(pb.PredictRequest(image=x).SerializeToString())
        else:
            out.append(pb.PredictRequest(text=x).SerializeToString())
    return out


# ---------------------------------------------------------------- the closed-loop client (its own process)

async def _client(address: str, method: str, requests: list[bytes], calls: int, in_flight: int,
                  conn: Any) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: no (de)serialisation in the client
        for i in range(min(50, calls)):  # connect and warm both sides; not counted
            await call(requests[i % len(requests)], timeout=10)
        conn.send("ready")
        conn.recv()
        left, errors = calls, {}
        t0, cpu0 = time.perf_counter(), time.process_time()

        async def worker(w: int) -> None:
            nonlocal left
            i = w
            while left > 0:
                left -= 1
                try:
                    await call(requests[i % len(requests)], timeout=10)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name.lower()] = errors.get(e.code().name.lower(), 0) + 1
                i += in_flight

        await asyncio.gather(*(worker(w) for w in range(in_flight)))
        return {"calls": calls, "errors": errors, "wall_s": time.perf_counter() - t0,
                "client_cpu_s": time.process_time() - cpu0}


def _client_main(address: str, method: str, requests: list[bytes], calls: int, in_flight: int, conn: Any) -> None:
    try:
        conn.send(asyncio.run(_client(address, method, requests, calls, in_flight, conn)))
    except Exception as e:  # reported by the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def closed_loop(address: str, method: str, requests: list[bytes], calls: int, in_flight: int,
                pids: dict[str, int], timeout_s: float = 300.0) -> dict[str, Any]:
    """`calls` calls with `in_flight` outstanding from a spawned client process; the CPU seconds each process
    of `pids` spent during the timed calls (`server_cpu_s`), the client's figures, and errors."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client_main, args=(address, method, requests, calls, in_flight, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(120):
            raise RuntimeError("closed-loop client not ready after 120 s")
        msg = parent.recv()
        if msg != "ready":
            raise RuntimeError(f"closed-loop client failed: {msg.get('error')}")
        before = cpu_seconds(pids)
        parent.send("go")
        if not parent.poll(timeout_s):
            raise RuntimeError(f"closed-loop client did not finish {calls} calls within {timeout_s:g} s")
        res = parent.recv()
        after = cpu_seconds(pids)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if "error" in res:
        raise RuntimeError(f"closed-loop client failed: {res['error']}")
    res["server_cpu_s"] = cpu_delta(before, after)
    return res


# ---------------------------------------------------------------- runtime cost of cnn (in-process)

def cnn_runtime_cpu_per_image(repository: Path, batches: tuple[int, ...] = (1, 2, 4, 8, 16),
                              seconds: float = 0.5) -> dict[int, float]:
    """CPU ms per image of the cnn model class called directly, by batch size (its config's threads)."""
    from cnn_service.model import CnnModel
    from mlplatform.repository import ModelRepository

    model = CnnModel(ModelRepository(repository).resolve("cnn"))
    model._load()
    images = np.load(repository / "cnn" / "1" / "heldout.npz")["images"].astype(np.float32)
    out = {}
    for b in batches:
        x = {"image": images[:b, None]}
        model.infer(x)
        n, t_end, cpu0 = 0, time.perf_counter() + seconds, time.process_time()
        while n < 5 or time.perf_counter() < t_end:
            model.infer(x)
            n += 1
        out[b] = 1000 * (time.process_time() - cpu0) / (n * b)
    return out


def nearest_batch(per_image: dict[int, float], mean_batch: float) -> int:
    """The measured batch size closest to the service's mean batch (on a log scale)."""
    return min(per_image, key=lambda b: abs(np.log(b) - np.log(max(1.0, mean_batch))))


# ---------------------------------------------------------------- the scenario

def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process's CPU (fraction of a core) while nothing calls it: health checks, metrics, timers."""
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return {role: v / seconds for role, v in cpu_delta(before, cpu_seconds(pids)).items()}


def measure_probes(stack: Stack, floor: ServiceProcess, levels: tuple[tuple[int, int], ...], idle_s: float
                   ) -> dict[str, dict[int, dict[str, Any]]]:
    """Every probe at every (in flight, calls) level: server CPU ms per request (gross, and net of the process's
    idle CPU over the same wall time) and the client's figures."""
    pids = {**stack.processes(), "floor": floor.proc.pid}
    address = {"floor": floor.target, **{m: s.target for m, s in stack.services.items()}}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    ports = stack.metrics_ports()
    idle = idle_cpu(pids, idle_s)
    for probe in PROBES:
        reqs = payloads(probe)
        for in_flight, calls in levels:
            n = max(in_flight * 10, int(calls * probe.calls_factor))
            if in_flight == 1 and probe.max_serial_calls:
                n = min(n, probe.max_serial_calls)
            before = scrape_all(ports)
            r = closed_loop(address[probe.role], probe.method, reqs, n, in_flight, pids)
            after = scrape_all(ports)
            cpu = r["server_cpu_s"].get(probe.role, 0.0)
            row = {"calls": n, "errors": r["errors"], "wall_s": r["wall_s"], "calls_per_s": n / r["wall_s"],
                   "server_cpu_s": cpu, "server_ms_per_call": 1000 * cpu / n,
                   "idle_core_fraction": idle.get(probe.role, 0.0),
                   "server_ms_per_call_net_of_idle": 1000 * (cpu - idle.get(probe.role, 0.0) * r["wall_s"]) / n,
                   "client_ms_per_call": 1000 * r["client_cpu_s"] / n}
            if probe.model:
                row["mean_batch"] = observed(before, after, probe.model)["mean_batch"]
            results.setdefault(probe.name, {})[in_flight] = row
            log(f"cost {probe.name} at {in_flight} in flight: {n} calls, {row['calls_per_s']:.0f}/s, server CPU "
                f"{row['server_ms_per_call']:.3f} ms per call, client {row['client_ms_per_call']:.3f} ms, "
                f"errors {r['errors'] or 0}")
    return results


def gateway_cost(stack: Stack, rate: float, duration_s: float) -> dict[str, dict[str, Any]]:
    """Fraud through Envoy at a steady open-loop `rate`, REST and typed gRPC, each after an unrecorded warm-up at
    the same rate (2 s, other keys): Envoy's and the service's CPU ms per answered call, and the latency."""
    pids = stack.processes()
    out = {}
    for kind in ("rest", "grpc"):
        warm = Target("fraud", kind, stack.gateway.target, tokens(keys_for(rate, 2.0), f"cost-warm-{kind}"))
        loadgen.run([warm], [Phase(min(2.0, duration_s), rate)], processes=loadgen.worker_processes(rate))
        toks = tokens(keys_for(rate, duration_s), f"cost-{kind}")
        target = Target("fraud", kind, stack.gateway.target, toks)
        cpu0: dict[str, float] = {}
        res = loadgen.run([target], [Phase(duration_s, rate)], processes=loadgen.worker_processes(rate),
                          on_start=lambda c=cpu0: c.update(cpu_seconds(pids)))
        cpu = cpu_delta(cpu0, cpu_seconds(pids))
        s = res.summary(slo_ms=50.0)
        answered = s["requests"] - s["not_sent"]
        out[kind] = {"rate": rate, "duration_s": duration_s, "answered": answered, "ok": s["ok"],
                     "errors": s["errors"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                     "envoy_ms_per_call": 1000 * cpu.get("envoy", 0.0) / answered if answered else None,
                     "service_ms_per_call": 1000 * cpu.get("fraud", 0.0) / answered if answered else None,
                     "generator_ms_per_call": 1000 * res.generator_cpu_s / answered if answered else None}
        log(f"cost gateway {kind} at {rate:g}/s: Envoy {fmt(out[kind]['envoy_ms_per_call'], 3)} ms per call, "
            f"fraud {fmt(out[kind]['service_ms_per_call'], 3)} ms, errors {s['errors']}")
    return out


def cost(out: Path, stack: Stack, cfg: Any) -> dict[str, Any]:
    """Server CPU per request of fraud (typed, OIP) and cnn against the gRPC floor, at 16 and 1 in flight; Envoy's
    CPU per REST and gRPC call at a steady rate. Writes cost.{json,md}."""
    from bench.scenarios import write

    floor = ServiceProcess("bench.floor_server", "FLOOR_").start(timeout=30)
    try:
        probes = measure_probes(stack, floor, cfg.cost_levels, cfg.cost_idle_s)
    finally:
        floor.stop()
        if floor.log_path:
            floor.log_path.unlink(missing_ok=True)
    runtime = cnn_runtime_cpu_per_image(stack.repository, seconds=cfg.cost_runtime_s)
    floor_ms = {k: v["server_ms_per_call"] for k, v in probes["floor"].items()}
    for levels in probes.values():
        for k, row in levels.items():
            row["x_floor"] = row["server_ms_per_call"] / floor_ms[k] if floor_ms.get(k) else None
    for k, row in probes["cnn"].items():
        b = nearest_batch(runtime, row.get("mean_batch", 1.0))
        row["runtime_batch"], row["runtime_ms_per_image"] = b, runtime[b]
        row["overhead_ms"] = row["server_ms_per_call"] - runtime[b]
        row["overhead_x_floor"] = row["overhead_ms"] / floor_ms[k] if floor_ms.get(k) else None
    gateway = gateway_cost(stack, cfg.cost_gateway_rate, cfg.cost_gateway_s)
    rows = verdicts.cost_rows({p: {k: r["server_ms_per_call"] for k, r in lv.items()} for p, lv in probes.items()},
                              {"rest": gateway["rest"]["envoy_ms_per_call"]})
    for k, row in sorted(probes["fraud_oip"].items(), reverse=True):
        rows.append(verdicts.row("1", f"fraud over OIP ModelInfer: server CPU per request at {k} in flight",
                                 f"{row['server_ms_per_call']:.3f} ms = {fmt(row['x_floor'], 2)}x floor",
                                 "reported", None))
    for k, row in sorted(probes["cnn"].items(), reverse=True):
        rows.append(verdicts.row("1", f"cnn typed Predict: overhead above the runtime at {k} in flight",
                                 f"{row['overhead_ms']:.3f} ms = {fmt(row['overhead_x_floor'], 2)}x floor",
                                 "falls as much as fraud's", None))
    rows.append(verdicts.row("1", "Envoy CPU per gRPC call (fraud, same rate)",
                             f"{fmt(gateway['grpc']['envoy_ms_per_call'], 3)} ms", "reported", None))
    data = {"levels": [list(lv) for lv in cfg.cost_levels], "probes": probes, "cnn_runtime_ms_per_image": runtime,
            "gateway": gateway, "targets": rows}
    md = ["## Per-request CPU against the gRPC floor (issue 13, item 1)", "",
          "One closed-loop client process (one grpc.aio channel, N calls in flight, requests serialised beforehand, "
          "answers not parsed) for every probe. **floor**: a bare `grpc.aio` server answering "
          "`grpc.health.v1.Health/Check` (`bench/floor_server.py`); **fraud**: the fraud service, cache off, typed "
          "`Predict`; **fraud_oip**: the same process over OIP `ModelInfer`; **cnn**: the cnn service, typed "
          "`Predict`. Server CPU per request = the server process's CPU time (user + system, every thread) during "
          "the timed calls ÷ calls.", "", *verdicts.targets_table(rows)]
    md += ["", "Idle CPU (nothing calling, % of a core) is measured first; \"net of idle\" subtracts it over each "
           "probe's wall time (it matters at 1 in flight, where calls are far apart). The verdicts use the gross "
           "figure.", "",
           "| probe | in flight | calls | calls/s | server CPU ms/call | x floor | net of idle ms/call | idle % | "
           "mean batch | client CPU ms/call | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, levels in probes.items():
        for k, r in levels.items():
            md.append(f"| {name} | {k} | {r['calls']} | {r['calls_per_s']:.0f} | {r['server_ms_per_call']:.3f} | "
                      f"{fmt(r['x_floor'], 2)} | {r['server_ms_per_call_net_of_idle']:.3f} | "
                      f"{100 * r['idle_core_fraction']:.1f} | {fmt(r.get('mean_batch'))} | "
                      f"{r['client_ms_per_call']:.3f} | "
                      f"{sum(r['errors'].values())} {r['errors'] or ''} |")
    md += ["", "cnn: the runtime alone (the service's model class in-process) costs "
           + ", ".join(f"{v:.3f} ms per image at batch {b}" for b, v in runtime.items())
           + "; overhead = the service's CPU per request - the runtime's per image at the batch size nearest the "
           "service's mean batch: "
           + ", ".join(f"{r['overhead_ms']:.3f} ms at {k} in flight (batch {r['runtime_batch']})"
                       for k, r in probes["cnn"].items()) + ".", "",
           f"**Gateway:** fraud through Envoy at {cfg.cost_gateway_rate:g} req/s open loop for "
           f"{cfg.cost_gateway_s:g} s (distinct standard keys); process CPU ÷ answered calls.", "",
           "| path | answered | Envoy CPU ms/call | fraud CPU ms/call | generator CPU ms/call | p50 ms | p99 ms | "
           "errors |", "|---|---|---|---|---|---|---|---|"]
    for kind, g in gateway.items():
        md.append(f"| {kind} | {g['answered']} | {fmt(g['envoy_ms_per_call'], 3)} | "
                  f"{fmt(g['service_ms_per_call'], 3)} | {fmt(g['generator_ms_per_call'], 3)} | {fmt(g['p50_ms'])} | "
                  f"{fmt(g['p99_ms'])} | {g['errors'] or 'none'} |")
    md.append("")
    return write(out, "cost", data, md)
