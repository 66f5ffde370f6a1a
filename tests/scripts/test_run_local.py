"""`make run`'s launcher: brings the stack up behind the gateway, prints calls that work, Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.support.procs import ROOT, free_port, read_until_ready, wait_for_port

pytestmark = pytest.mark.integration

# The cnn and generic services' ports (free ones; replica 1 adds 100).
CNN_PORTS = {"CNN_GRPC_PORT": str(free_port()), "CNN_METRICS_PORT": str(free_port()),
             "GENERIC_GRPC_PORT": str(free_port()), "GENERIC_METRICS_PORT": str(free_port())}


def curl_token(text: str) -> str:
    """The `TOKEN=...` line the launcher printed."""
    found = re.search(r"  (TOKEN=\S+)\n", text)
    assert found, text
    return found.group(1)


def test_run_local_serves_the_printed_call_and_stops_on_ctrl_c(model_repository, tmp_path):
    grpc_port, metrics_port, redis_port = free_port(), free_port(), free_port()
    gateway_port, admin_port = free_port(), free_port()
    sentiment_port = free_port()
    env = {**os.environ, "FRAUD_GRPC_PORT": str(grpc_port), "FRAUD_METRICS_PORT": str(metrics_port),
           "GATEWAY_PORT": str(gateway_port), "GATEWAY_ADMIN_PORT": str(admin_port), "PYTHONUNBUFFERED": "1",
           **CNN_PORTS,
           "SENTIMENT_GRPC_PORT": str(sentiment_port), "SENTIMENT_METRICS_PORT": str(free_port()),
           "RUN_CONTROL_SOCKET": str(tmp_path / "run.sock")}  # not the one of a developer's own make run
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--model-repository", str(model_repository),
         "--redis-port", str(redis_port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        text = read_until_ready(proc, 180)
        assert "The platform is up" in text, text
        assert "`make rollout`" in text  # how to roll new code or models in
        assert f"redis: started on 127.0.0.1:{redis_port}" in text
        assert f"fraud: SERVING on 127.0.0.1:{grpc_port}" in text
        assert f"cnn: SERVING on 127.0.0.1:{CNN_PORTS['CNN_GRPC_PORT']}" in text
        # The printed cnn curl (base64 of the model's sample image) through the gateway.
        cnn_curl = re.search(r"  (curl -s http://\S+/api/v1/cnn .*?\}\")\n", text, re.S)
        assert cnn_curl, text
        cnn_call = subprocess.run(["bash", "-c", f"{curl_token(text)}\n{cnn_curl.group(1)}"], capture_output=True,
                                  text=True, timeout=30)
        classification = json.loads(cnn_call.stdout)["classification"]
        assert classification["model_name"] == "cnn" and len(classification["classes"]) == 3
        sample_label = np.load(model_repository / "cnn" / "1" / "heldout.npz")["labels"][0]  # sample.png's digit
        assert classification["classes"][0]["label"] == str(sample_label)
        assert f"sentiment: SERVING on 127.0.0.1:{sentiment_port}" in text
        snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
        assert snippet, text
        call = subprocess.run([sys.executable, "-"], input=snippet.group(1), capture_output=True, text=True,
                              timeout=30, cwd=ROOT)
        assert call.returncode == 0, call.stderr
        assert 'transaction_id: "tx-1"' in call.stdout and 'model_name: "fraud"' in call.stdout
        direct = float(re.search(r"fraud_probability: (\S+)", call.stdout).group(1))
        # The printed curl, with its fresh token, through the gateway: same answer as direct gRPC.
        assert f"gateway: Envoy on 127.0.0.1:{gateway_port}" in text
        curl = re.search(r"  (TOKEN=\S+)\n  (curl .*?\}\}')\n", text, re.S)
        assert curl, text
        via_gateway = subprocess.run(["bash", "-c", f"{curl.group(1)}\n{curl.group(2)}"], capture_output=True,
                                     text=True, timeout=30)
        body = json.loads(via_gateway.stdout)["prediction"]
        assert body["transaction_id"] == "tx-1" and body["model_name"] == "fraud"
        assert body["fraud_probability"] == pytest.approx(direct, rel=1e-6)
        # The printed sentiment curl, through the gateway.
        sentiment_curl = re.search(r"  (curl -s \S+/api/v1/sentiment .*?\}')\n", text, re.S)
        assert sentiment_curl, text
        answer = subprocess.run(["bash", "-c", f"{curl.group(1)}\n{sentiment_curl.group(1)}"], capture_output=True,
                                text=True, timeout=30)
        prediction = json.loads(answer.stdout)["prediction"]
        assert prediction["label"] == "positive" and prediction["model_name"] == "sentiment"
        # The fourth model, config-only (the generic service): the printed curl through the gateway
        # answers what ONNX Runtime answers for the sample row, in typed JSON contents.
        assert f"generic: SERVING on 127.0.0.1:{CNN_PORTS['GENERIC_GRPC_PORT']}" in text
        diabetes_curl = re.search(r"  (curl -s \S+/api/v1/diabetes .*?\}\]\}')\n", text, re.S)
        assert diabetes_curl, text
        answer = subprocess.run(["bash", "-c", f"{curl.group(1)}\n{diabetes_curl.group(1)}"], capture_output=True,
                                text=True, timeout=30)
        body = json.loads(answer.stdout)
        assert body["model_name"] == "diabetes" and body["outputs"][0]["name"] == "progression"
        import onnxruntime as ort

        row = json.loads((model_repository / "diabetes" / "1" / "sample.json").read_text())["rows"][0]["features"]
        session = ort.InferenceSession(str(model_repository / "diabetes" / "1" / "model.onnx"))
        expected = session.run(None, {"features": np.asarray([row], np.float32)})[0][0, 0]
        assert body["outputs"][0]["contents"]["fp32_contents"][0] == pytest.approx(float(expected), rel=1e-5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopped." in rest and "fraud: stopped" in rest
        for port in (grpc_port, redis_port, gateway_port, admin_port, sentiment_port):
            with pytest.raises(TimeoutError):
                wait_for_port(port, timeout=0.3)
    finally:
        if proc.poll() is None:  # a failed assertion: Ctrl-C still stops every process it started
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_run_local_puts_replicas_behind_the_gateway(model_repository, tmp_path):
    grpc_port, metrics_port, gateway_port, admin_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "FRAUD_GRPC_PORT": str(grpc_port), "FRAUD_METRICS_PORT": str(metrics_port),
           "GATEWAY_PORT": str(gateway_port), "GATEWAY_ADMIN_PORT": str(admin_port), "PYTHONUNBUFFERED": "1",
           **CNN_PORTS,
           "SENTIMENT_GRPC_PORT": str(free_port()), "SENTIMENT_METRICS_PORT": str(free_port()),
           "RUN_CONTROL_SOCKET": str(tmp_path / "run.sock")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--model-repository", str(model_repository),
         "--redis-port", str(free_port()), "--replicas", "2", "--no-wait"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"fraud: SERVING on 127.0.0.1:{grpc_port}" in out
    assert f"fraud[1]: SERVING on 127.0.0.1:{grpc_port + 100} (metrics :{metrics_port + 100})" in out
    cnn_grpc, cnn_metrics = int(CNN_PORTS["CNN_GRPC_PORT"]), int(CNN_PORTS["CNN_METRICS_PORT"])
    assert f"cnn[1]: SERVING on 127.0.0.1:{cnn_grpc + 100} (metrics :{cnn_metrics + 100})" in out
    assert "sentiment[1]: SERVING on" in out
    assert "generic[1]: SERVING on" in out
    assert "8/8 upstream hosts healthy (+4 free slots for rollouts)" in out, out  # 4 services x 2 replicas
    assert "stopped." in out


def test_tls_run_prints_https_calls_that_work(model_repository, tmp_path):
    """`TLS=1 make run`: the gateway serves TLS with the dev certificate; the printed curl (https, --cacert the dev
    CA) answers, and plaintext gets a redirect."""
    gateway_port = free_port()
    env = {**os.environ, "FRAUD_GRPC_PORT": str(free_port()), "FRAUD_METRICS_PORT": str(free_port()),
           "GATEWAY_PORT": str(gateway_port), "GATEWAY_ADMIN_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
           "TLS": "1", "RUN_CONTROL_SOCKET": str(tmp_path / "run.sock")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--model-repository", str(model_repository),
         "--redis-port", str(free_port()), "--services", "fraud"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text = read_until_ready(proc, 180)
        assert "The platform is up" in text, text
        call = re.search(r"  (curl -s --cacert \S+ https://localhost:\d+/api/v1/fraud .*?\}')\n", text, re.S)
        assert call, text
        done = subprocess.run(["bash", "-c", f"{curl_token(text)}\n{call.group(1)}"], capture_output=True, text=True,
                              timeout=30)
        assert json.loads(done.stdout)["prediction"]["model_name"] == "fraud", done.stdout + done.stderr
        plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{gateway_port}/api/v1/fraud"], capture_output=True, text=True,
                               timeout=10)
        assert plain.stdout == "308"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert "stopped." in out


def test_mtls_run_puts_mutual_tls_between_the_gateway_and_the_services(model_repository, tmp_path):
    """`MTLS=1 make run`: the printed curl through the gateway answers; the service's own port refuses a
    plaintext client, and its health answers in plaintext on the port + 50 (what the supervisor checks)."""
    import grpc
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as rpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from deploy.catalog import HEALTH_PORT_OFFSET
    from mlplatform.launch import port_free
    from tests.scripts.stack import RunLocal

    run = RunLocal(tmp_path, model_repository)
    while not port_free(run.fraud_port + HEALTH_PORT_OFFSET):  # the health port beside it
        run.fraud_port = free_port()
    grpc_port, health_port = run.fraud_port, run.fraud_port + HEALTH_PORT_OFFSET
    run.env.update({"FRAUD_GRPC_PORT": str(grpc_port), "MTLS": "1"})
    run.start(timeout=180)
    try:
        text = run.output
        assert "The platform is up" in text, text
        assert "# mTLS (MTLS=1)" in text and f"127.0.0.1:{health_port} grpc.health.v1.Health/Check" in text
        call = re.search(r"  (curl -s http://\S+/api/v1/fraud .*?\}')\n", text, re.S)
        assert call, text
        done = subprocess.run(["bash", "-c", f"{curl_token(text)}\n{call.group(1)}"], capture_output=True, text=True,
                              timeout=30)
        assert json.loads(done.stdout)["prediction"]["model_name"] == "fraud", done.stdout + done.stderr
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                rpc.FraudServiceStub(channel).Predict(pb.PredictRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        run.stop()
    assert "stopped." in run.output
