"""docs/runbooks/add-a-model.md, followed step by step on a copy of the repository: the runbook's own
build script (the `# models/iris/build.py` block) goes into the copy, one line of deploy/services.yaml
lists the model, the commands behind `make models`, `make k8s-manifests` and `make run` build, generate
and start it, and the new model answers through the gateway."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import ROOT, free_port, read_until_ready

pytestmark = pytest.mark.integration

RUNBOOK = ROOT / "docs" / "runbooks" / "add-a-model.md"


def runbook_build_script() -> str:
    """The runbook's example build script, exactly as a reader would copy it."""
    blocks = re.findall(r"```python\n(.*?)```", RUNBOOK.read_text(), re.S)
    [script] = [b for b in blocks if b.startswith("# models/iris/build.py\n")]
    return script


def copy_repository(dest: Path, model_repository: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the repository, and the built models (hard links)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shutil.copytree(model_repository, dest / "model_repository", copy_function=os.link,
                    ignore=shutil.ignore_patterns(".tmp-*", ".old-*"))


def test_the_runbook_adds_a_config_only_model_that_answers_through_the_gateway(model_repository, tmp_path):
    repo = tmp_path / "repo"
    copy_repository(repo, model_repository)
    # Step 1: the build script.
    (repo / "models" / "iris").mkdir()
    (repo / "models" / "iris" / "build.py").write_text(runbook_build_script())
    # Step 2: one line in deploy/services.yaml; `make models` and `make k8s-manifests`.
    services = repo / "deploy" / "services.yaml"
    text = services.read_text()
    assert text.count("    models: [diabetes]\n") == 1
    services.write_text(text.replace("    models: [diabetes]\n", "    models: [diabetes, iris]\n"))
    built = subprocess.run([sys.executable, "-m", "deploy.catalog", "build", "--repository", "model_repository"],
                           cwd=repo, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "iris v1: held-out accuracy" in built.stdout
    config = json.loads((repo / "model_repository" / "iris" / "1" / "config.json").read_text())
    assert config["parameters"]["heldout_accuracy"] >= 0.9
    generated = subprocess.run([sys.executable, "-m", "deploy.generate"], cwd=repo, capture_output=True, text=True,
                               timeout=120)
    assert generated.returncode == 0, generated.stderr
    manifest = (repo / "k8s" / "base" / "services" / "generic.yaml").read_text()
    assert "GENERIC_MODELS: diabetes,iris" in manifest and "cp -R /repository/iris /models/" in manifest
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "gateway-envoy" not in changed  # the gateway routes the generic service, not each of its models
    # Step 3: `make run`, then the call.
    ports = {f"{p}{kind}_PORT": str(free_port()) for p in ("FRAUD_", "CNN_", "SENTIMENT_", "GENERIC_")
             for kind in ("GRPC", "METRICS")}
    gateway_port = free_port()
    env = {**os.environ, **ports, "GATEWAY_PORT": str(gateway_port), "GATEWAY_ADMIN_PORT": str(free_port()),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "scripts/run_local.py", "--model-repository", "model_repository",
                             "--redis-port", str(free_port())], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        printed = read_until_ready(proc, 240)
        assert "The platform is up" in printed, printed
        assert "/api/v1/iris" in printed  # make run says how to call it
        token = re.search(r"  TOKEN=(\S+)\n", printed).group(1)
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 4],
                            "contents": {"fp32_contents": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}}]}
        request = urllib.request.Request(f"http://127.0.0.1:{gateway_port}/api/v1/iris", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["model_name"] == "iris"
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["label"]["contents"]["int64_contents"] == ["0", "2"]  # setosa, virginica
        probabilities = outputs["probabilities"]["contents"]["fp32_contents"]
        assert len(probabilities) == 6 and probabilities[0] > 0.9 and probabilities[5] > 0.5
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
