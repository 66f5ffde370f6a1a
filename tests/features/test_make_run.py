"""`make run` (scripts/run_local.py) fills the feature store, and the printed call by card_id works through Envoy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.support.procs import ROOT, free_port, read_until_ready

pytestmark = pytest.mark.integration


def test_make_run_scores_by_card_through_the_gateway(model_repository, tmp_path):
    redis_port, gateway_port = free_port(), free_port()
    env = {**os.environ, "FRAUD_GRPC_PORT": str(free_port()), "FRAUD_METRICS_PORT": str(free_port()),
           "GATEWAY_PORT": str(gateway_port), "GATEWAY_ADMIN_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
           "RUN_CONTROL_SOCKET": str(tmp_path / "run.sock"),
           "FRAUD_FEATURE_TIMEOUT_MS": "1000"}  # a busy machine must not turn the call into defaults
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--model-repository", str(model_repository),
         "--redis-port", str(redis_port), "--services", "fraud"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text = read_until_ready(proc, 120)
        assert "The platform is up" in text, text
        assert f"materialize: 10000 cards into fraud:card:<card_id> at redis://127.0.0.1:{redis_port}/0" in text, text
        token = re.search(r"  (TOKEN=\S+)\n", text)
        calls = [c for c in re.findall(r"  (curl -s \S+/api/v1/fraud [^\n]*\n[^\n]*)\n", text) if "card_id" in c]
        assert token and len(calls) == 1, text
        answers = [json.loads(subprocess.run(["bash", "-c", f"{token.group(1)}\n{calls[0]}"],
                                             capture_output=True, text=True, timeout=30).stdout)["prediction"]
                   for _ in range(2)]
        for answer in answers:
            assert answer["card_id"] == "card-000042" and answer["model_name"] == "fraud"
            assert answer["feature_source"] == "store"
            assert 0.0 <= answer.get("fraud_probability", 0.0) <= 1.0
        assert not answers[0].get("cached") and answers[1]["cached"]  # the same transaction again: a repeat
        audit = subprocess.run(["redis-cli", "-p", str(redis_port), "XLEN", "fraud:audit"], capture_output=True,
                               text=True, timeout=10)
        assert int(audit.stdout) >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
