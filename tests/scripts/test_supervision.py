"""`make run` keeps serving when its processes die: a SIGKILLed replica and a SIGKILLed Redis are restarted on their
own ports, with a log line, while REST and gRPC traffic through the gateway loses no request."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from mlplatform.launch import grpc_serving as serving
from tests.scripts.stack import RunLocal, Traffic, wait_until

pytestmark = pytest.mark.integration


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16) == b"+PONG\r\n"
    except OSError:
        return False


@pytest.fixture
def features(model_repository) -> list[float]:
    return json.loads((model_repository / "fraud" / "1" / "sample.json").read_text())["rows"][0]["features"]


def test_killed_replica_and_redis_come_back_and_no_request_fails(tmp_path, model_repository, features):
    run = RunLocal(tmp_path, model_repository, services="fraud", replicas=2)
    try:
        run.start()
        replicas = {r["name"]: r for r in run.replicas()}
        assert set(replicas) == {"fraud", "fraud[1]"}
        victim = replicas["fraud[1]"]
        assert victim["port"] == run.fraud_port + 100 and serving(victim["port"])
        redis = run.status()["redis"]
        assert redis["alive"] and redis_ping(run.redis_port)
        with Traffic(run, features) as traffic:
            traffic.wait_for(40)
            os.kill(victim["pid"], signal.SIGKILL)
            run.wait_for_output(rf"supervisor: fraud\[1\] \(pid {victim['pid']}\) killed by SIGKILL; restarting", 10)
            run.wait_for_output(r"supervisor: fraud\[1\] restarted \(pid \d+, restart 1\): SERVING on "
                                rf"127\.0\.0\.1:{victim['port']}", 60)
            back = {r["name"]: r for r in run.replicas()}["fraud[1]"]
            assert back["pid"] != victim["pid"] and back["alive"] and back["restarts"] == 1
            assert serving(victim["port"])
            traffic.wait_for(40)

            os.kill(redis["pid"], signal.SIGKILL)
            run.wait_for_output(rf"supervisor: redis \(pid {redis['pid']}\) killed by SIGKILL; restarting", 10)
            run.wait_for_output(rf"supervisor: redis restarted \(pid \d+, restart 1\): listening on "
                                rf"127\.0\.0\.1:{run.redis_port}", 30)
            wait_until(lambda: redis_ping(run.redis_port), 10, "Redis answering PING again")
            assert run.status()["redis"]["pid"] != redis["pid"]
            traffic.wait_for(40)
        assert traffic.failures == [], traffic.failures[:10]
        assert traffic.ok >= 120
        # The replica that was never touched kept its process.
        assert {r["name"]: r for r in run.replicas()}["fraud"]["pid"] == replicas["fraud"]["pid"]
        assert run.stop() == 0, run.output[-3000:]
        assert "stopped." in run.output
    finally:
        run.stop()
