"""scripts/supervise.py on its own: the restart backoff, a supervised process restarted after it dies and not after
it is stopped, start-up failures, and the control socket (one make run per socket)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.scripts.stack import supervise, wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_backoff_doubles_to_its_maximum_and_resets_after_a_healthy_run():
    backoff = supervise.Backoff(initial=0.5, maximum=10, reset_after=30)
    assert [backoff.delay(healthy_for=1) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.delay(healthy_for=30) == 0.5  # ran healthy long enough: back to the start
    assert backoff.delay(healthy_for=0) == 1


def test_a_process_that_dies_is_restarted_and_a_stopped_one_is_not(capsys):
    proc = supervise.Supervised("sleeper", SLEEPER, backoff=supervise.Backoff(initial=0.1))
    proc.start(timeout=10)
    try:
        first = proc.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: proc.restarts == 1 and proc.alive and proc.pid != first, 10, "a restart")
        out = capsys.readouterr().out
        assert f"supervisor: sleeper (pid {first}) killed by SIGKILL; restarting it in 0.1 s" in out
        assert f"supervisor: sleeper restarted (pid {proc.pid}, restart 1): ready" in out
    finally:
        assert proc.stop(5) == -signal.SIGTERM
    time.sleep(0.3)
    assert not proc.alive and proc.restarts == 1


def test_a_retired_process_ends_without_a_restart():
    proc = supervise.Supervised("old", SLEEPER)
    proc.start(timeout=10)
    proc.retire()
    proc.signal(signal.SIGKILL)
    assert proc.wait(5) == -signal.SIGKILL
    time.sleep(0.8)  # past the first backoff
    assert not proc.alive and proc.restarts == 0


def test_start_fails_when_the_process_exits_or_is_not_ready_in_time():
    with pytest.raises(supervise.StartError, match="broken: exited with code 3 during start-up"):
        supervise.Supervised("broken", [sys.executable, "-c", "raise SystemExit(3)"],
                             ready=lambda: False).start(timeout=10)
    slow = supervise.Supervised("slow", SLEEPER, ready=lambda: False)
    with pytest.raises(supervise.StartError, match="slow: not ready in time"):
        slow.start(timeout=0.3)
    assert not slow.alive  # stopped, not left behind


def test_control_socket_round_trip_and_one_make_run_per_socket(tmp_path):
    path = tmp_path / "run.sock"

    def echo(request, say):
        say("working")
        if request.get("fail"):
            raise supervise.ControlError("cannot")
        return {"echo": request["value"]}

    server = supervise.ControlServer(path, {"echo": echo})
    try:
        progress: list[str] = []
        assert supervise.control(path, {"op": "echo", "value": 7}, progress.append, timeout=5) == {
            "done": True, "ok": True, "echo": 7}
        assert progress == ["working"]
        assert supervise.control(path, {"op": "echo", "fail": True}, timeout=5)["error"] == "cannot"
        assert "unknown op 'nope'" in supervise.control(path, {"op": "nope"}, timeout=5)["error"]
        with pytest.raises(SystemExit, match="another `make run` is running"):
            supervise.claim_socket_path(path)
    finally:
        server.close()
    assert not path.exists()
    with pytest.raises(supervise.NotRunning):
        supervise.control(path, {"op": "echo"}, timeout=5)
    path.touch()  # a stale file left by a killed make run is taken over
    supervise.claim_socket_path(path)
    assert not path.exists()
