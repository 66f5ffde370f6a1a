"""`make rollout` (scripts/rollout.py against a running `make run`): every replica replaced one at a time, drained
first, with no failed request through the gateway, REST or gRPC, even with one replica; new model files are
picked up by the new processes; a replacement that cannot start leaves the old replica serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc

from mlplatform.launch import grpc_serving as serving
from tests.scripts.stack import ROLLOUT, RunLocal, Traffic

pytestmark = pytest.mark.integration


@pytest.fixture
def fraud_repository(tmp_path, model_repository):
    """A model repository of its own holding the fraud model's version 1 (the tests add or break versions)."""
    repo = tmp_path / "models"
    shutil.copytree(model_repository / "fraud" / "1", repo / "fraud" / "1")
    return repo


@pytest.fixture
def features(fraud_repository) -> list[float]:
    return json.loads((fraud_repository / "fraud" / "1" / "sample.json").read_text())["rows"][0]["features"]


def add_version(repo, version: int) -> None:
    """fraud/<version>: the same model as version 1, a newer version number."""
    target = repo / "fraud" / str(version)
    shutil.copytree(repo / "fraud" / "1", target)
    config = json.loads((target / "config.json").read_text())
    config["version"] = version
    (target / "config.json").write_text(json.dumps(config))


def served_version(port: int, features: list[float]) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = pb.PredictRequest(transaction=pb.Transaction(transaction_id="v", features=features))
        return rpc.FraudServiceStub(channel).Predict(request, timeout=10).prediction.model_version


@pytest.mark.parametrize("replicas", [1, 2])
def test_rollout_replaces_every_replica_with_no_failed_request(tmp_path, fraud_repository, features, replicas):
    run = RunLocal(tmp_path, fraud_repository, services="fraud", replicas=replicas)
    try:
        run.start()
        before = run.replicas()
        assert len(before) == replicas
        assert {served_version(r["port"], features) for r in before} == {"1"}
        add_version(fraud_repository, 2)  # an upgrade: the new processes serve the newest version
        with Traffic(run, features) as traffic:
            traffic.wait_for(30)
            done = run.rollout("--service", "fraud")
            assert done.returncode == 0, done.stdout + done.stderr + run.output[-4000:]
            traffic.wait_for(30)
        assert traffic.failures == [], traffic.failures[:10]
        after = run.replicas()
        assert len(after) == replicas
        assert not {r["pid"] for r in before} & {r["pid"] for r in after}  # every process replaced
        for replica in after:
            assert replica["alive"] and serving(replica["port"])
            assert served_version(replica["port"], features) == "2"
        # Each old replica was drained and out of rotation before it was stopped.
        assert done.stdout.count("out of rotation, nothing in flight; stopping it (SIGTERM)") == replicas, done.stdout
        assert f"rollout done: {replicas} replica(s) replaced" in done.stdout
        assert run.stop() == 0, run.output[-3000:]
    finally:
        run.stop()


def test_a_replacement_that_cannot_start_leaves_the_old_replica_serving(tmp_path, fraud_repository, features):
    run = RunLocal(tmp_path, fraud_repository, services="fraud", replicas=1)
    try:
        run.start()
        [before] = run.replicas()
        (fraud_repository / "fraud" / "1" / "model.onnx").write_bytes(b"not a model")  # a broken upgrade
        with Traffic(run, features) as traffic:
            traffic.wait_for(20)
            failed = run.rollout()
            traffic.wait_for(20)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "rollout: failed: fraud[1]:" in failed.stderr and "fraud keeps serving" in failed.stderr, failed.stderr
        assert traffic.failures == [], traffic.failures[:10]
        [after] = run.replicas()
        assert after["pid"] == before["pid"] and after["alive"] and serving(after["port"])
        assert run.stop() == 0, run.output[-3000:]
    finally:
        run.stop()


def test_rollout_without_make_run_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(ROLLOUT), "--control-socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no `make run` is running" in done.stderr and "start it with `make run`" in done.stderr
