"""`make rollout [SERVICE=fraud]`: replace every replica of the running `make run`, one at a time, with no failed
request (new code and new model files are picked up by the new processes).

For each replica, make run (scripts/run_local.py) starts a new process on the service's free port slot, waits
until it is SERVING and the gateway routes to it, drains the old one (SIGUSR1) until the gateway has taken it
out of rotation with nothing in flight, then stops it. This script asks for that over make run's control
socket and prints the progress. Exit 0 when every replica was replaced; 1 when one could not be (the old one
keeps serving: it is never stopped before its replacement is healthy); 2 when no make run answers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from supervise import NotRunning, control

ROOT = Path(__file__).resolve().parents[1]
CONTROL_SOCKET = ROOT / ".run" / "supervisor.sock"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service",
                        help="roll only this service's replicas (default: every service)")
    parser.add_argument("--control-socket", type=Path,
                        default=Path(os.environ.get("RUN_CONTROL_SOCKET", CONTROL_SOCKET)),
                        help="make run's control socket (default: .run/supervisor.sock)")
    args = parser.parse_args(argv)
    request = {"op": "rollout", **({"service": args.service} if args.service else {})}
    try:
        answer = control(args.control_socket, request, on_progress=lambda line: print(f"rollout: {line}", flush=True))
    except NotRunning as exc:
        print(f"rollout: {exc}; start it with `make run`", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"rollout: failed: {exc}", file=sys.stderr)
        return 1
    if not answer["ok"]:
        print(f"rollout: failed: {answer['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
