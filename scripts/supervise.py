"""Process supervision for `make run` (scripts/run_local.py) and its control socket (`make rollout`).

`Supervised` keeps one child process running: it starts it, waits until a readiness check passes, and when
the process dies on its own starts it again after a backoff (0.5 s doubling to 10 s; back to 0.5 s once a
process has been ready for 30 s), logging each exit and each restart. `terminate` / `stop` end it for good and
`retire` lets the current process end without a restart (a rollout's old replica).

`ControlServer` answers JSON lines on a unix socket: one request `{"op": ...}` per connection, answered by
progress lines `{"progress": "..."}` and one last line `{"done": true, "ok": ..., ...}`; `control()` is the
client. Only the standard library: see docs/runbooks/rollouts.md for why not supervisord, honcho or circus.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def log(message: str) -> None:
    """One line of the supervisor's own, on make run's console."""
    print(f"supervisor: {message}", flush=True)


@dataclass
class Backoff:
    """Restart delays: `initial`, doubling up to `maximum`; back to `initial` once the process that died had been
    ready (healthy) for `reset_after` seconds, so a crash after a long healthy run restarts at once while a
    crash loop slows down."""

    initial: float = 0.5
    maximum: float = 10.0
    reset_after: float = 30.0
    _next: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def delay(self, healthy_for: float) -> float:
        """The wait before the next start of a process that died after `healthy_for` seconds of readiness."""
        if healthy_for >= self.reset_after:
            self._next = self.initial
        delay, self._next = self._next, min(self._next * 2, self.maximum)
        return delay


class StartError(RuntimeError):
    """A process exited, or was not ready in time, before its first readiness (it has been stopped)."""


def exit_reason(code: int | None) -> str:
    """`exited with code 1`, `killed by SIGKILL`."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


class Supervised:
    """One child process kept running.

    `ready()` says whether the current process is ready (a gRPC SERVING check, an open port); None: as soon as
    it started. `halt`, when set, stops every restart (make run is stopping). Children run in their own session:
    a Ctrl-C in the terminal reaches make run only, which stops them in order.
    """

    def __init__(self, name: str, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, ready: Callable[[], bool] | None = None, ready_message: str = "ready",
                 stdout: IO[Any] | int | None = None, backoff: Backoff | None = None,
                 halt: threading.Event | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready = ready
        self.ready_message = ready_message
        self.stdout = stdout
        self.backoff = backoff or Backoff()
        self.halt = halt or threading.Event()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.ready_at: float | None = None
        self._stopped = threading.Event()  # no restart after the current process
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float) -> None:
        """Start the process and block until it is ready, then supervise it (restarts) from a thread.
        StartError (the process stopped) when it exits or is not ready within `timeout`."""
        proc = self._spawn()
        if proc is None:
            raise StartError(f"{self.name}: start-up interrupted")
        failure = self._wait_ready(proc, time.monotonic() + timeout)
        if failure is not None:
            self.stop(5)
            raise StartError(f"{self.name}: {failure}")
        threading.Thread(target=self._watch, args=(proc,), name=f"supervise-{self.name}", daemon=True).start()

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopped.is_set() or self.halt.is_set():
                return None
            self.ready_at = None
            self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=self.stdout,
                                         start_new_session=True)
            return self.proc

    def _wait_ready(self, proc: subprocess.Popen, deadline: float | None) -> str | None:
        """None once `proc` is ready; otherwise why not (it exited, it is being stopped, the deadline passed)."""
        while True:
            if proc.poll() is not None:
                return f"{exit_reason(proc.returncode)} during start-up (see its log above)"
            if self._stopped.is_set() or self.halt.is_set():
                return "start-up interrupted"
            if self.ready is None or self.ready():
                self.ready_at = time.monotonic()
                return None
            if deadline is not None and time.monotonic() > deadline:
                return "not ready in time"
            time.sleep(0.1)

    def _watch(self, proc: subprocess.Popen) -> None:
        """Wait for the process; unless stopped, start it again after the backoff, and so on."""
        while True:
            code = proc.wait()
            if self._stopped.is_set() or self.halt.is_set():
                return
            healthy_for = time.monotonic() - self.ready_at if self.ready_at is not None else 0.0
            delay = self.backoff.delay(healthy_for)
            log(f"{self.name} (pid {proc.pid}) {exit_reason(code)}; restarting it in {delay:g} s")
            if self._stopped.wait(delay) or self.halt.is_set():
                return
            spawned = self._spawn()
            if spawned is None:
                return
            proc = spawned
            self.restarts += 1
            if self._wait_ready(proc, None) is None:
                log(f"{self.name} restarted (pid {proc.pid}, restart {self.restarts}): {self.ready_message}")

    def retire(self) -> None:
        """Let the current process end without a restart (it is being replaced)."""
        self._stopped.set()

    def signal(self, sig: int) -> None:
        """Send `sig` to the current process, if it runs."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def terminate(self) -> None:
        """Stop for good: no restart, SIGTERM to the current process."""
        with self._lock:
            self._stopped.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def wait(self, timeout: float) -> int | None:
        """Until the current process has exited (killed after `timeout` s); its exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {proc.pid}) still running {timeout:g} s after SIGTERM; killing it")
            proc.kill()
            return proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """`terminate`, then `wait`."""
        self.terminate()
        return self.wait(timeout)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "alive": self.alive, "ready": self.ready_at is not None,
                "restarts": self.restarts}


class ControlError(Exception):
    """A control request that cannot be done; its message goes back to the client."""


class NotRunning(ConnectionError):
    """Nothing answers on the control socket: no `make run` is running."""


Handler = Callable[[dict[str, Any], Callable[[str], None]], dict[str, Any]]
"""A control operation: (request, say) -> the final answer's fields; `say` sends a progress line."""


class _RequestHandler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        def send(message: dict[str, Any]) -> None:
            try:
                self.wfile.write((json.dumps(message) + "\n").encode())
                self.wfile.flush()
            except OSError:
                pass  # the client went away; the operation carries on

        try:
            request = json.loads(self.rfile.readline() or b"{}")
            handler = self.server.handlers.get(request.get("op"))
            if handler is None:
                raise ControlError(f"unknown op {request.get('op')!r}; known: {', '.join(self.server.handlers)}")
            answer = handler(request, lambda line: send({"progress": line}))
            send({"done": True, "ok": True, **answer})
        except (ControlError, ValueError) as exc:
            send({"done": True, "ok": False, "error": str(exc)})
        except Exception as exc:  # reported to the client, make run keeps running
            send({"done": True, "ok": False, "error": f"{type(exc).__name__}: {exc}"})


def claim_socket_path(path: Path) -> None:
    """Make `path` free for a new control socket; SystemExit when a live one (another make run) answers there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # left by a make run that was killed
            return
    raise SystemExit(f"another `make run` is running (it answers on {path}); stop it first")


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The control socket of a running `make run`: `handlers` by op name, each request in its own thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        claim_socket_path(path)
        self.path = path
        self.handlers = dict(handlers)
        super().__init__(str(path), _RequestHandler)
        os.chmod(path, 0o600)
        threading.Thread(target=self.serve_forever, name="control", daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


def control(path: Path, request: dict[str, Any], on_progress: Callable[[str], None] | None = None,
            timeout: float | None = None) -> dict[str, Any]:
    """Send `request` to the make run listening on `path`; progress lines go to `on_progress`; the final answer.
    NotRunning when nothing answers there; ConnectionError when it closes before answering."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"no `make run` is running: nothing answers on {path}") from exc
        sock.sendall((json.dumps(request) + "\n").encode())
        with sock.makefile("r", encoding="utf-8") as lines:
            for line in lines:
                message = json.loads(line)
                if message.get("done"):
                    return message
                if on_progress is not None:
                    on_progress(message.get("progress", ""))
    raise ConnectionError(f"make run closed the control connection ({path}) before answering (is it stopping?)")
