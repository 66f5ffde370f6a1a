"""Hot swaps of a real fraud service under steady load: 50 swaps between two real builds lose no request,
label every answer with the version that computed it and keep resident memory flat; a version that fails to
load leaves the served one in place; poll mode picks up a published version folder and a removed one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from bench.swaps import run_swaps
from tests.fraud.helpers import predict_request, stub
from tests.support.metrics import scrape
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.integration


def fraud(repository: Path, **env: str) -> ServiceProcess:
    return ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(repository), "FRAUD_CACHE_ENABLED": "false", **env}).start(timeout=120)


def test_fifty_swaps_under_steady_load_lose_nothing_mislabel_nothing_and_keep_memory_flat(versioned_repository):
    svc = fraud(versioned_repository, FRAUD_MODEL_CONTROL_MODE="explicit")
    try:
        assert svc.proc is not None
        report = run_swaps(svc.target, svc.proc.pid, versioned_repository, swaps=50)
    finally:
        svc.stop()
    summary = report.summary()
    assert report.failures == [], summary
    assert report.wrong == [], summary
    assert report.not_serving == 0 and report.health_checks > 50, summary
    # Traffic on both versions over both transports: the swaps really happened under load.
    assert {"grpc v1", "grpc v2", "oip v1", "oip v2"} <= set(report.answers), summary
    assert sum(report.answers.values()) > 500, summary
    assert len(report.rss_mib) == 50
    assert abs(report.rss_growth) <= 0.05, f"RSS {report.rss_mib[0]:.1f} -> {report.rss_mib[-1]:.1f} MiB"


def test_a_version_that_fails_to_load_keeps_the_served_one_with_a_log_line_and_a_metric(versioned_repository,
                                                                                      tmp_path, fraud_rows):
    repo = tmp_path / "repo"
    (repo / "fraud").mkdir(parents=True)
    for v in ("1", "2"):
        (repo / "fraud" / v).symlink_to(versioned_repository / "fraud" / v, target_is_directory=True)
    svc = fraud(repo, FRAUD_MODEL_CONTROL_MODE="explicit")
    client = tc.InferenceServerClient(svc.target)
    try:
        broken = repo / "fraud" / "3"
        shutil.copytree(versioned_repository / "fraud" / "2", broken)
        config = (broken / "config.json").read_text().replace('"version": 2', '"version": 3')
        (broken / "config.json").write_text(config)
        (broken / "model.onnx").write_bytes(b"not an onnx model")
        with pytest.raises(InferenceServerException) as err:
            client.load_model("fraud")
        assert err.value.status() == "StatusCode.INTERNAL"
        assert err.value.message().startswith("failed to load fraud v3: ")
        assert err.value.message().endswith("; still serving versions [2]")
        channel, typed = stub(svc.target)
        with channel:
            assert typed.Predict(predict_request(fraud_rows[0][0]), timeout=5).prediction.model_version == "2"
        assert client.is_server_ready() and client.is_model_ready("fraud", "2")
        assert not client.is_model_ready("fraud", "3")
        [entry] = [m for m in client.get_model_repository_index(as_json=True)["models"] if m["version"] == "3"]
        assert entry["state"] == "UNAVAILABLE" and entry["reason"].startswith("load failed: ")
        samples = scrape(svc.metrics_port)
        assert samples[("inference_model_loads_total", frozenset({
            "model": "fraud", "version": "3", "outcome": "failure", "stage": "load"}.items()))] == 1
        assert "model fraud v3 failed to come up (load failed: " in svc.logs()
        assert "the versions served before keep serving" in svc.logs()
    finally:
        client.close()
        svc.stop()


def test_poll_mode_serves_a_published_version_folder_and_drops_a_removed_one(versioned_repository, tmp_path,
                                                                            fraud_rows):
    repo = tmp_path / "repo"
    (repo / "fraud").mkdir(parents=True)
    (repo / "fraud" / "1").symlink_to(versioned_repository / "fraud" / "1", target_is_directory=True)
    svc = fraud(repo, FRAUD_MODEL_CONTROL_MODE="poll", FRAUD_REPOSITORY_POLL_S="0.2")
    channel, typed = stub(svc.target)

    def served_version(within: float, want: str) -> str:
        deadline = time.monotonic() + within
        while True:
            version = typed.Predict(predict_request(fraud_rows[0][0]), timeout=5).prediction.model_version
            if version == want or time.monotonic() > deadline:
                return version
            time.sleep(0.05)

    try:
        assert served_version(0, "1") == "1"
        # Publish the way the runbook says: build or copy elsewhere, then one rename into place.
        staging = repo / ".staging-2"
        shutil.copytree(versioned_repository / "fraud" / "2", staging)
        os.rename(staging, repo / "fraud" / "2")
        assert served_version(15, "2") == "2"
        shutil.rmtree(repo / "fraud" / "2")
        assert served_version(15, "1") == "1"
        client = tc.InferenceServerClient(svc.target)
        try:
            with pytest.raises(InferenceServerException, match="not allowed in model control mode 'poll'"):
                client.load_model("fraud")
        finally:
            client.close()
        assert "model fraud: serving versions [2] (policy: latest 1)" in svc.logs()
    finally:
        channel.close()
        svc.stop()
