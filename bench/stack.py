"""The platform under test, started with the project's own machinery on free loopback ports, and the
probes the scenarios read while load runs: the services' Prometheus metrics and per-process CPU.

`Stack` = Redis + the three services (mlplatform.launch.ServiceProcess, the same modules
`make run` starts) + the real Envoy gateway (GatewayProcess, local variant, rendered like
`make run`). `Sampler` polls queue depth, batch sizes, rejections, cache lookups and CPU in a
background thread, so a timeline (the spike) and the limiting process can be shown.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from mlplatform_gateway.local import GatewayProcess

from deploy import catalog
from mlplatform.launch import RedisServer, ServiceProcess

MODELS = ("fraud", "cnn", "sentiment")
"""The models the scenarios load by default (the headline mix); any model of deploy/services.yaml can be started."""
SLO_P99_MS = {"fraud": 50.0, "sentiment": 200.0, "cnn": 100.0}
"""p99 SLOs: fraud and sentiment from the seed; cnn has none there, 100 ms is this bench's assumption."""


def log(msg: str) -> None:
    """A progress line on stdout, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def service(model: str, repository: Path, *, redis_url: str | None = None, cache: bool = True,
            extra_env: dict[str, str] | None = None) -> ServiceProcess:
    """A started service for `model` (the one deploy/services.yaml names) on free ports (SERVING), at WARNING."""
    svc = catalog.models()[model]
    prefix = svc.env_prefix
    env = {f"{prefix}MODEL_REPOSITORY": str(repository), f"{prefix}LOG_LEVEL": "WARNING",
           **({f"{prefix}MODELS": model} if svc.config_only else {}),
           f"{prefix}CACHE_ENABLED": "true" if cache else "false", **(extra_env or {})}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return ServiceProcess(svc.module, prefix, env=env).start(timeout=180)


@contextlib.contextmanager
def owned_processes(keys_dir: Path) -> Iterator[dict[str, ServiceProcess | GatewayProcess]]:
    """A dict to register processes in (name -> process, before `start()`, so a start-up failure still stops
    them). On exit they are stopped in reverse order and their files removed, with the tail of each log
    printed when the block failed; `keys_dir` (the bench's signing keys) is removed too."""
    procs: dict[str, ServiceProcess | GatewayProcess] = {}
    try:
        yield procs
    except Exception:
        for name, proc in procs.items():
            print(f"--- {name} log (tail) ---\n{proc.logs()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
            if isinstance(proc, GatewayProcess):
                shutil.rmtree(proc.workdir, ignore_errors=True)
            elif proc.log_path:
                proc.log_path.unlink(missing_ok=True)
        shutil.rmtree(keys_dir, ignore_errors=True)


@dataclass
class Stack:
    """Redis, every model service and the gateway, on free ports. Use as a context manager."""

    repository: Path
    models: tuple[str, ...] = MODELS
    cache: bool = False
    redis: RedisServer | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    gateway: GatewayProcess | None = None

    def __enter__(self) -> Stack:
        try:
            if shutil.which("redis-server"):
                self.redis = RedisServer().start()
            for m in self.models:
                log(f"starting {m} service")
                self.services[m] = service(m, self.repository, redis_url=self.redis.url if self.redis else None,
                                           cache=self.cache)
            from mlplatform_gateway import auth
            from mlplatform_gateway import local as gateway_local

            key = auth.ensure_dev_keys(gateway_local.DEFAULT_KEY_DIR)
            log("starting the gateway (Envoy)")
            self.gateway = GatewayProcess({m: [s.target] for m, s in self.services.items()}, key.jwks_path).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.gateway:
            self.gateway.stop()
        for s in self.services.values():
            s.stop()
        if self.redis:
            self.redis.stop()

    def processes(self) -> dict[str, int]:
        """Role -> pid of every server-side process."""
        out = {m: s.proc.pid for m, s in self.services.items() if s.proc}
        if self.gateway and self.gateway.proc:
            out["envoy"] = self.gateway.proc.pid
        if self.redis and self.redis.proc:
            out["redis"] = self.redis.proc.pid
        return out

    def metrics_ports(self) -> dict[str, int]:
        return {m: s.metrics_port for m, s in self.services.items()}

    def wait_idle(self, timeout_s: float = 30.0) -> float:
        """Wait until every service's batcher queue is empty (after an overload); returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            depth = sum(total(scrape(p), "inference_queue_depth") for p in self.metrics_ports().values())
            if depth == 0:
                break
            time.sleep(0.5)
        return time.monotonic() - t0


def tokens(n: int, prefix: str, tier: str | None = None) -> tuple[str, ...]:
    """`n` gateway tokens for distinct API keys (`sub` = prefix-i), signed with the dev key."""
    from mlplatform_gateway import auth
    from mlplatform_gateway import local as gateway_local

    key = auth.ensure_dev_keys(gateway_local.DEFAULT_KEY_DIR)
    return tuple(auth.mint_token(key, f"{prefix}-{i}", tier=tier, ttl_s=3600) for i in range(n))


def keys_for(rate: float, duration_s: float) -> int:
    """Distinct standard keys (100 req/min each) so that round-robin at `rate` stays at ≤ 80 % of every key's
    limit over any minute (never fewer than 1)."""
    per_minute = rate * min(60.0, duration_s)
    return max(1, int(per_minute / 80) + 1)


# ---------------------------------------------------------------- metrics

_LINE = re.compile(r"^(inference_[a-z_]+?)(?:\{([^}]*)\})? (\S+)$")


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value of the service's inference_* metrics (empty dict when unreachable)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out[f"{m.group(1)}{{{m.group(2) or ''}}}"] = float(m.group(3))
    return out


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    s = 0.0
    for key, v in metrics.items():
        n, _, rest = key.partition("{")
        if n == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            s += v
    return s


def counters(metrics: dict[str, float], model: str) -> dict[str, float]:
    """The counters a scenario diffs: batches, rows, rejections, cache hits and misses."""
    return {
        "batches": total(metrics, "inference_batch_size_count", model=model),
        "rows": total(metrics, "inference_batch_size_sum", model=model),
        "rejected": total(metrics, "inference_rejected_total", model=model),
        "cache_hit": total(metrics, "inference_cache_total", model=model, result="hit"),
        "cache_miss": total(metrics, "inference_cache_total", model=model, result="miss"),
        "queue_wait_s": total(metrics, "inference_queue_wait_seconds_sum", model=model),
        "queue_wait_n": total(metrics, "inference_queue_wait_seconds_count", model=model),
    }


def batch_histogram(metrics: dict[str, float], model: str) -> dict[str, float]:
    """Cumulative batch-size bucket counts (le -> count)."""
    return histogram(metrics, "inference_batch_size", model)


def histogram(metrics: dict[str, float], name: str, model: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts for one model (le -> count, summed over its other labels)."""
    out: dict[str, float] = {}
    for key, v in metrics.items():
        if key.startswith(f"{name}_bucket{{") and f'model="{model}"' in key:
            le = re.search(r'le="([^"]+)"', key).group(1)
            out[le] = out.get(le, 0.0) + v
    return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def observed(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], model: str) -> dict[str, Any]:
    """What the service saw between two scrapes: batches, mean batch, rows, rejections, cache hit rate,
    batch-size histogram (non-cumulative), mean queue wait."""
    d = diff(counters(after[model], model), counters(before[model], model))
    hb, ha = batch_histogram(before[model], model), batch_histogram(after[model], model)
    cum = {le: ha[le] - hb.get(le, 0.0) for le in ha}
    hist, prev = {}, 0.0
    for le in sorted(cum, key=lambda s: float("inf") if s == "+Inf" else float(s)):
        if cum[le] - prev > 0:
            hist[le] = cum[le] - prev
        prev = cum[le]
    lookups = d["cache_hit"] + d["cache_miss"]
    return {"batches": d["batches"], "rows": d["rows"], "mean_batch": d["rows"] / d["batches"] if d["batches"] else 0.0,
            "batch_hist_le": hist, "rejected": d["rejected"],
            "cache_hit_rate": d["cache_hit"] / lookups if lookups else None, "cache_hits": d["cache_hit"],
            "mean_queue_wait_ms": 1000 * d["queue_wait_s"] / d["queue_wait_n"] if d["queue_wait_n"] else None}


def scrape_all(ports: dict[str, int]) -> dict[str, dict[str, float]]:
    return {m: scrape(p) for m, p in ports.items()}


# ---------------------------------------------------------------- sampling over time

class Sampler:
    """Background thread: every `interval_s`, each service's queue depth and rejections, the CPU
    (% of one core) of every watched process and of the load generator's processes, and the whole
    machine's CPU (other users' processes included; 100 % per core)."""

    def __init__(self, metrics_ports: dict[str, int], pids: dict[str, int], interval_s: float = 0.5) -> None:
        self.ports, self.interval_s = metrics_ports, interval_s
        self.procs = {role: psutil.Process(pid) for role, pid in pids.items()}
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.t0 = 0.0

    def _loop(self) -> None:
        for p in self.procs.values():
            p.cpu_percent(None)
        me = psutil.Process()
        me.cpu_percent(None)
        psutil.cpu_percent(None)
        known: dict[int, psutil.Process] = {}
        while not self._stop.wait(self.interval_s):
            row: dict[str, Any] = {"t": time.time() - self.t0, "queue_depth": {}, "rejected": {}, "cpu": {}}
            for m, port in self.ports.items():
                met = scrape(port)
                row["queue_depth"][m] = total(met, "inference_queue_depth", model=m)
                row["rejected"][m] = total(met, "inference_rejected_total", model=m)
            for role, p in self.procs.items():
                try:
                    row["cpu"][role] = p.cpu_percent(None)
                except psutil.Error:
                    row["cpu"][role] = 0.0
            gen = 0.0
            for child in me.children(recursive=True):
                if child.pid not in known:
                    known[child.pid] = child
                    with contextlib.suppress(psutil.Error):
                        child.cpu_percent(None)
                    continue
                if child.pid in {p.pid for p in self.procs.values()}:
                    continue
                with contextlib.suppress(psutil.Error):
                    gen += known[child.pid].cpu_percent(None)
            row["cpu"]["loadgen"] = gen + me.cpu_percent(None)  # its workers and this coordinating process
            # Everything on the machine (other users included), in % of one core like the rest: 2 cores = 200.
            row["machine_cpu"] = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
            self.samples.append(row)

    def __enter__(self) -> Sampler:
        self.t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def cpu_means(self, t_from: float = 0.0, t_to: float = float("inf")) -> dict[str, float]:
        """Mean CPU (% of one core) per process over samples with t in [t_from, t_to).

        An empty window gives an empty dict (and a log line), never the mean of other samples: a caller that
        reports it shows "no samples" instead of another period's figures."""
        rows = [s for s in self.samples if t_from <= s["t"] < t_to]
        if not rows:
            log(f"Sampler: no CPU samples between t={t_from:.1f} and t={t_to:.1f} s "
                f"({len(self.samples)} samples in all); CPU not reported for that window")
            return {}
        means = {role: sum(r["cpu"].get(role, 0.0) for r in rows) / len(rows) for role in rows[0]["cpu"]}
        means["machine"] = sum(r["machine_cpu"] for r in rows) / len(rows)
        return means


# ---------------------------------------------------------------- CPU time per process

def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """Role -> CPU seconds (user + system, every thread) the process has used since it started; a process that
    is gone is left out."""
    out = {}
    for role, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process spent between two `cpu_seconds` readings (roles present in both)."""
    return {role: after[role] - before[role] for role in after if role in before}
