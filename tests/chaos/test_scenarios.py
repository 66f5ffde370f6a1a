"""Two real chaos scenarios, shortened: the fraud service's two supervised replicas behind the real Envoy, steady
REST + gRPC traffic through it, answers checked against the healthy platform's.

- a replica SIGKILLed: the gateway retries what it had in flight on the other replica, the supervisor restarts it;
- Envoy hot-restarted with a changed config: epoch 1 serves the new route timeout, nothing is cut.

What the platform may answer under CPU starvation (a clear 429 / RESOURCE_EXHAUSTED from admission control) is
allowed here; a reset, a 5xx, a timeout or a wrong answer is not. The full scenarios, with their figures, are
`make chaos` (RELIABILITY.md)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from chaos.platform import Platform
from chaos.scenarios import Context, gateway_hot_restart, replica_kill
from chaos.traffic import Verifier


def test_replica_kill_and_envoy_hot_restart(model_repository: Path, tmp_path: Path) -> None:
    platform = Platform(tmp_path / "run", model_repository, ("fraud",), replicas=2).start()
    try:
        verifier = Verifier("127.0.0.1", platform.gateway_port, model_repository, models=("fraud",))
        verifier.learn()
        ctx = Context(platform, 20.0, verifier, tmp_path, scale=0.3, mix={"fraud/rest": 0.6, "fraud/grpc": 0.4})
        old_pid = platform.replica("fraud", 0).pid

        kill = replica_kill(ctx)
        assert kill.error is None, kill.error
        assert kill.requests >= 200
        assert kill.outcomes.get("ok", 0) >= 0.9 * kill.requests, kill.outcomes
        assert kill.unclear == {}, kill.outcomes  # nothing reset, timed out or 5xx: retried on the other replica
        assert kill.checks.sent > 0 and kill.checks.wrong == 0 and kill.checks.same > 0
        assert platform.replica("fraud", 0).pid != old_pid  # restarted by the supervisor
        assert platform.replica("fraud", 0).restarts == 1
        assert kill.recovery_s is not None

        hot = gateway_hot_restart(ctx)
        assert hot.error is None, hot.error
        assert platform.epoch == 1
        assert hot.unclear == {}, hot.outcomes
        assert hot.checks.wrong == 0 and hot.checks.same > 0
        dump = urllib.request.urlopen(f"http://127.0.0.1:{platform.admin_port}/config_dump", timeout=5).read().decode()
        assert '"timeout": "14s"' in dump  # epoch 1 runs the changed config (the unary route timeout)
        assert "timeout: 15s" in (platform.workdir / "gateway" / "envoy-epoch0.yaml").read_text()
    finally:
        platform.stop()
