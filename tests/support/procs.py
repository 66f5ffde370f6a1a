"""The process launchers the tests use, re-exported from their installable homes, and reading `make run`."""

import subprocess
import time

from mlplatform_gateway.local import GatewayProcess

from mlplatform.launch import ROOT, RedisServer, ServiceProcess, free_port, wait_for_port

__all__ = ["ROOT", "GatewayProcess", "RedisServer", "ServiceProcess", "free_port", "read_until_ready", "wait_for_port"]


def read_until_ready(proc: subprocess.Popen, timeout: float = 240.0) -> str:
    """What scripts/run_local.py printed up to its "Press Ctrl-C" line (or its exit, or `timeout`)."""
    output: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    return "".join(output)
