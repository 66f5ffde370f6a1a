"""The platform under chaos: `make run`'s own machinery (scripts/run_local.py's `Stack` and scripts/supervise.py:
two supervised replicas per service on port slots behind the real Envoy, restarted when they die), with three
differences that the faults need:

- Redis is started here and the services reach it through a `DelayProxy` (so it can be slowed, and killed and
  restarted on the same port);
- every replica has fault injection armed (`MLPLATFORM_FAULTS` = a control file in the run's directory);
- Envoy runs with hot restart enabled (a dynamic base id), so `hot_restart` can start epoch n+1 with a changed
  config that takes the listening sockets over from epoch n.

Everything binds 127.0.0.1, on ports picked free at start (never `make run`'s defaults), under one run directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from mlplatform_gateway import auth
from mlplatform_gateway import local as gateway

from chaos.proxy import DelayProxy
from mlplatform import faults
from mlplatform.launch import RedisServer, port_free

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import run_local  # noqa: E402  (scripts/run_local.py: make run's Stack)
from supervise import Supervised  # noqa: E402

SERVICES = ("fraud", "cnn", "sentiment")
"""The services a chaos run starts by default (every typed model service; the config-only generic one has no
traffic in the mix)."""


def pick_ports(count: int, slots: int, stride: int = run_local.SLOT_STRIDE, start: int = 20000) -> list[int]:
    """`count` base ports, each free together with its `slots` - 1 slot ports (base + stride·i), none of them
    shared; searched upwards from `start` (below the ephemeral range)."""
    found: list[int] = []
    taken: set[int] = set()
    port = start
    while len(found) < count:
        ports = [port + stride * i for i in range(slots)]
        if not taken.intersection(ports) and all(port_free(p) for p in ports):
            found.append(port)
            taken.update(ports)
        port += 7
        if port > 32000:
            raise RuntimeError("no free loopback ports for the chaos platform")
    return found


@dataclass
class Platform:
    """Redis (+ its delaying proxy), every service's replicas and the hot-restartable gateway, under `workdir`."""

    workdir: Path
    repository: Path
    services: tuple[str, ...] = SERVICES
    replicas: int = 2

    def start(self) -> Platform:
        self.workdir = self.workdir.resolve()  # the replicas run in the repository root
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._environ = dict(os.environ)  # restored by stop(): the replicas read it on every (re)start
        self.faults_file = self.workdir / "faults.json"
        faults.write(self.faults_file, {})
        os.environ[faults.ENV] = str(self.faults_file)  # the replicas' environment is make run's, copied
        wanted = [s for s in run_local.SERVICES if s.name in self.services]
        bases = pick_ports(2 * len(wanted) + 2, self.replicas + 1)
        for i, svc in enumerate(wanted):
            os.environ[f"{svc.env_prefix}GRPC_PORT"] = str(bases[2 * i])
            os.environ[f"{svc.env_prefix}METRICS_PORT"] = str(bases[2 * i + 1])
            os.environ.setdefault(f"{svc.env_prefix}LOG_LEVEL", "ERROR")  # the report says what failed
        self.gateway_port, self.admin_port = bases[-2], bases[-1]
        self.redis = RedisServer().start()
        self.proxy = DelayProxy(self.redis.port).start()
        self.stack = run_local.Stack(self.repository, run_local.selected_services(",".join(self.services)),
                                     self.replicas, self.gateway_port, self.admin_port)
        try:
            self.stack.start_redis(self.proxy.port)
            self.stack.materialize_features()
            for group in self.stack.groups.values():
                for slot in range(self.replicas):
                    self.stack.start_replica(group, slot)
            self.epoch = 0
            self.start_gateway()
            self.stack.up.set()
        except BaseException:
            self.stop()
            raise
        return self

    # -- the gateway, hot-restartable ---------------------------------------------------------------------------

    def gateway_config(self, epoch: int, overrides: dict[str, Any] | None = None) -> Path:
        """Render the local gateway config for every slot (as make run does) into the run directory."""
        jwks = auth.ensure_dev_keys(gateway.DEFAULT_KEY_DIR).jwks_path
        files = gateway.prepare_files_dir(self.workdir / "gateway", jwks)
        path = files / f"envoy-epoch{epoch}.yaml"
        endpoints = {name: group.endpoints() for name, group in self.stack.groups.items()}
        path.write_text(gateway.render_local(files, self.gateway_port, self.admin_port, endpoints,
                                             files / "access.log", overrides))
        return path

    def envoy_command(self, config: Path, epoch: int) -> list[str]:
        """make run's Envoy command line with hot restart on: epoch 0 gets a dynamic base id (written to a file),
        later epochs reuse it; the parent drains for DRAIN_TIME_S and exits a few seconds later."""
        cmd = [a for a in gateway.envoy_command(config, drain_time_s=gateway.DRAIN_TIME_S)
               if a != "--disable-hot-restart"]
        base_id_file = self.workdir / "gateway" / "base-id"
        if epoch == 0:
            base_id_file.unlink(missing_ok=True)
            cmd += ["--use-dynamic-base-id", "--base-id-path", str(base_id_file)]
        else:
            cmd += ["--base-id", base_id_file.read_text().strip()]
        return [*cmd, "--restart-epoch", str(epoch), "--parent-shutdown-time-s", str(gateway.DRAIN_TIME_S + 3)]

    def start_gateway(self, overrides: dict[str, Any] | None = None, timeout: float = 30.0) -> None:
        """Start Envoy epoch `self.epoch` and wait until every occupied slot is healthy in it."""
        config = self.gateway_config(self.epoch, overrides)
        log = (self.workdir / "gateway" / f"envoy-epoch{self.epoch}.log").open("w")
        proc = Supervised("gateway", self.envoy_command(config, self.epoch), cwd=ROOT,
                          ready=self._envoy_live, stdout=log, halt=self.stack.stopping)
        proc.start(timeout)
        self.stack.gateway = proc
        hosts = sum(len(group.occupied()) for group in self.stack.groups.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if gateway.healthy_hosts(self.admin_port, self.stack.groups) == hosts:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway epoch {self.epoch}: not all {hosts} upstream hosts healthy after {timeout:g} s")

    def hot_restart(self, overrides: dict[str, Any]) -> tuple[int | None, int | None]:
        """Envoy hot restart with a changed config: epoch n+1 takes the sockets over, epoch n drains and exits
        (it is not restarted by the supervisor). Returns (old pid, new pid)."""
        old = self.stack.gateway
        assert old is not None
        old.retire()
        self.epoch += 1
        self.start_gateway(overrides)
        return old.pid, self.stack.gateway.pid

    def _envoy_live(self) -> bool:
        try:
            return gateway.is_live(self.admin_port)
        except OSError:
            return False

    # -- Redis ----------------------------------------------------------------------------------------------------

    def kill_redis(self) -> None:
        """SIGKILL redis-server and cut the proxy's connections (the services see Redis gone)."""
        assert self.redis.proc is not None
        self.redis.proc.kill()
        self.redis.proc.wait(10)
        self.redis.proc = None
        self.proxy.cut()

    def restart_redis(self) -> None:
        """A fresh redis-server on the same port (empty: no persistence, as in make run)."""
        self.redis.start()

    def redis_cli(self, *args: str) -> str:
        """`redis-cli` against the real Redis (not through the proxy)."""
        return subprocess.run(["redis-cli", "-p", str(self.redis.port), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    # -- processes ----------------------------------------------------------------------------------------------

    def replica(self, service: str, slot: int = 0) -> Supervised:
        proc = self.stack.groups[service].slots[slot]
        assert proc is not None, f"{service} slot {slot} is empty"
        return proc

    def processes(self) -> dict[str, int]:
        """Role -> pid of every server-side process now (replicas as `fraud[1]`, `gateway`, `redis`)."""
        out: dict[str, int] = {}
        for group in self.stack.groups.values():
            for slot, proc in enumerate(group.slots):
                if proc is not None and proc.pid is not None:
                    out[group.name(slot)] = proc.pid
        if self.stack.gateway is not None and self.stack.gateway.pid is not None:
            out["gateway"] = self.stack.gateway.pid
        if self.redis.proc is not None:
            out["redis"] = self.redis.proc.pid
        return out

    def metrics_ports(self) -> dict[str, list[int]]:
        """Service -> metrics ports of its occupied slots."""
        return {name: [group.metrics_port(slot) for slot in group.occupied()]
                for name, group in self.stack.groups.items()}

    def wait_all_healthy(self, timeout: float = 60.0) -> bool:
        """Until every occupied slot is SERVING and healthy in the gateway (after a fault)."""
        hosts = sum(len(group.occupied()) for group in self.stack.groups.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if gateway.healthy_hosts(self.admin_port, self.stack.groups) == hosts:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        """Everything, in make run's order (gateway drained, replicas, then Redis and the proxy)."""
        stack = getattr(self, "stack", None)
        if stack is not None:
            stack.shutdown()
        if getattr(self, "proxy", None) is not None:
            self.proxy.stop()
        if getattr(self, "redis", None) is not None:
            self.redis.stop()
        if getattr(self, "_environ", None) is not None:
            os.environ.clear()
            os.environ.update(self._environ)


def process_tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants (a replica's runtime workers, if any)."""
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []
