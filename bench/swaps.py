"""Hot swaps under steady load: `python -m bench swaps` (and `make bench-swaps`).

A fraud service in explicit model control mode serves a repository with two real builds of the model
(version 1 from `make models`, version 2 built here with another seed). While client threads send steady
traffic (typed gRPC `Predict` and OIP `ModelInfer` through tritonclient, none pinning a version), the
driver swaps the served version back and forth with tritonclient's `load_model` and a version-policy
override, N times. It checks that no request failed, that every answer's probability is the one its
version label's model gives for that row (ONNX Runtime on each version's file, in this process), that
health never left SERVING nor ModelReady false, and it records the service's resident memory (VmRSS) after each swap.

`run_swaps` is the measurement; tests/lifecycle/test_hot_swap.py runs it as a test.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SwapReport:
    """What one run of `run_swaps` saw."""

    swaps: int
    swap_seconds: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    """Resident memory of the service after each swap (index 0: after the 1st)."""
    answers: Counter[str] = field(default_factory=Counter)
    """Answers per (transport, version label)."""
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    """Answers whose value is not their labelled version's."""
    not_serving: int = 0
    """Health checks that did not find the service SERVING and ModelReady("fraud") true."""
    health_checks: int = 0
    seconds: float = 0.0

    @property
    def rss_growth(self) -> float:
        """RSS after the last swap relative to after the first (0.01 = 1 % more)."""
        return self.rss_mib[-1] / self.rss_mib[0] - 1.0

    def summary(self) -> dict[str, object]:
        out = {k: v for k, v in asdict(self).items() if k not in ("swap_seconds", "rss_mib", "answers")}
        out.update(answers=dict(self.answers), failures=self.failures[:10], wrong=self.wrong[:10],
                   requests=sum(self.answers.values()) + len(self.failures),
                   swap_median_s=statistics.median(self.swap_seconds), swap_max_s=max(self.swap_seconds),
                   rss_first_mib=self.rss_mib[0], rss_last_mib=self.rss_mib[-1],
                   rss_max_mib=max(self.rss_mib), rss_growth_pct=100 * self.rss_growth,
                   # The versions differ in size: after the 2nd swap the same version is served as after
                   # an even-numbered last one, a like-for-like comparison.
                   rss_same_version_growth_pct=100 * (self.rss_mib[-1] / self.rss_mib[1 - self.swaps % 2] - 1)
                   if len(self.rss_mib) > 1 else 0.0,
                   rss_mib=self.rss_mib)
        return out


def rss_mib(pid: int) -> float:
    """Resident set size of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def reference(repository: Path, versions: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows from the versions' samples on which the versions disagree (by more than 1e-3, so an answer's
    value tells which version computed it) and, per version, the fraud probability ONNX Runtime gives
    each row with that version's file."""
    import onnxruntime as ort

    rows = np.asarray([r["features"] for v in versions
                       for r in json.loads((repository / "fraud" / v / "sample.json").read_text())["rows"]],
                      dtype=np.float32)
    expected = {}
    for v in versions:
        session = ort.InferenceSession(str(repository / "fraud" / v / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        expected[v] = session.run(["probabilities"], {"features": rows})[0][:, 1]
    first, *others = expected.values()
    telling = np.all([np.abs(first - e) > 1e-3 for e in others], axis=0)
    return rows[telling], {v: e[telling] for v, e in expected.items()}


def run_swaps(target: str, pid: int, repository: Path, swaps: int = 50, clients: int = 2,
              pause_s: float = 0.004, versions: tuple[str, str] = ("1", "2")) -> SwapReport:
    """Swap fraud between `versions` `swaps` times under steady load; see the module docstring."""
    import tritonclient.grpc as tc
    from fraud.v1 import fraud_pb2 as pb
    from fraud.v1 import fraud_pb2_grpc as pb_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rows, expected = reference(repository, versions)
    report = SwapReport(swaps=swaps)
    stop = threading.Event()
    lock = threading.Lock()

    def check(transport: str, i: int, version: str, probability: float) -> None:
        with lock:
            report.answers[f"{transport} v{version}"] += 1
            if version not in expected or abs(probability - float(expected[version][i])) > 1e-5:
                want = {v: round(float(e[i]), 6) for v, e in expected.items()}
                report.wrong.append(f"{transport} row {i}: v{version} answered {probability:.6f}, expected {want}")

    def fail(transport: str, err: Exception) -> None:
        with lock:
            report.failures.append(f"{transport}: {getattr(err, 'code', lambda: '')()} "
                                   f"{getattr(err, 'details', lambda: err)()}")

    def typed(seed: int) -> None:
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.FraudServiceStub(channel)
        i = seed
        while not stop.is_set():
            i = (i + 7) % len(rows)
            try:
                answer = stub.Predict(pb.PredictRequest(transaction=pb.Transaction(
                    transaction_id=f"swap-{i}", features=rows[i].tolist())), timeout=5).prediction
                check("grpc", i, answer.model_version, answer.fraud_probability)
            except grpc.RpcError as err:
                fail("grpc", err)
            time.sleep(pause_s)
        channel.close()

    def oip() -> None:
        client = tc.InferenceServerClient(target)
        i = 0
        while not stop.is_set():
            i = (i + 3) % len(rows)
            inp = tc.InferInput("features", [1, rows.shape[1]], "FP32")
            inp.set_data_from_numpy(rows[i:i + 1])
            try:
                result = client.infer("fraud", [inp], outputs=[tc.InferRequestedOutput("probabilities")],
                                      client_timeout=5)
                check("oip", i, result.get_response().model_version, float(result.as_numpy("probabilities")[0, 1]))
            except Exception as err:  # tritonclient raises InferenceServerException
                with lock:
                    report.failures.append(f"oip: {err}")
            time.sleep(pause_s)
        client.close()

    def health() -> None:
        channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(channel)
        client = tc.InferenceServerClient(target)
        while not stop.is_set():
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                ok = status == health_pb2.HealthCheckResponse.SERVING and client.is_model_ready("fraud")
            except Exception:  # grpc.RpcError, tritonclient's InferenceServerException
                ok = False
            with lock:
                report.health_checks += 1
                report.not_serving += not ok
            time.sleep(0.02)
        client.close()
        channel.close()

    threads = [threading.Thread(target=typed, args=(k,), daemon=True) for k in range(clients)]
    threads += [threading.Thread(target=oip, daemon=True), threading.Thread(target=health, daemon=True)]
    control = tc.InferenceServerClient(target)
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for n in range(swaps):
            version = versions[(n + 1) % 2]  # the service starts on the newest; swap to the other first
            policy = json.dumps({"version_policy": {"specific": {"versions": [int(version)]}}})
            t0 = time.monotonic()
            control.load_model("fraud", config=policy)
            report.swap_seconds.append(time.monotonic() - t0)
            report.rss_mib.append(rss_mib(pid))
            time.sleep(0.1)  # traffic on the new version before the next swap
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        control.close()
    report.seconds = time.monotonic() - started
    return report


def second_version(repository: Path, work: Path) -> Path:
    """A repository with fraud v1 (linked from `repository`) and a real v2 build (seed 7) under `work`."""
    from fraud_service.build_model import build

    target = work / "fraud"
    if not (target / "2" / "model.onnx").is_file():
        target.mkdir(parents=True, exist_ok=True)
        if not (target / "1").exists():
            (target / "1").symlink_to((repository / "fraud" / "1").resolve(), target_is_directory=True)
        build(work, version=2, seed=7, rows=20_000)
    return work


def swaps(out: Path, repository: Path, quick: bool = False) -> dict[str, object]:
    """The bench scenario: start fraud (explicit control, cache off), run the swaps, write swaps.json."""
    from mlplatform.launch import ServiceProcess

    repo = second_version(repository, out / "swaps-repository")
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(repo), "FRAUD_MODEL_CONTROL_MODE": "explicit",
        "FRAUD_CACHE_ENABLED": "false"}).start(timeout=120)
    try:
        assert svc.proc is not None
        report = run_swaps(svc.target, svc.proc.pid, repo, swaps=6 if quick else 50)
    finally:
        svc.stop()
    summary = report.summary()
    (out / "swaps.json").write_text(json.dumps(summary, indent=2))
    (out / "swaps.md").write_text(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    """The report's section for the swaps scenario."""
    verdict = "met" if abs(s["rss_growth_pct"]) <= 5 and not s["failures"] and not s["wrong"] else "NOT met"
    return "\n".join([
        "## Hot swaps under load (issue 14)", "",
        f"{s['swaps']} swaps of fraud between two real builds (tritonclient `load_model` with a version-policy "
        f"override) while 2 typed gRPC clients and 1 OIP client sent {s['requests']} requests in "
        f"{s['seconds']:.1f} s; health checked {s['health_checks']} times.", "",
        "| figure | value |", "|---|---|",
        f"| failed requests | {len(s['failures'])} |",
        f"| answers whose value is not their version label's | {len(s['wrong'])} |",
        f"| health not SERVING or ModelReady false | {s['not_serving']} of {s['health_checks']} checks |",
        f"| answers per transport and version | {', '.join(f'{k}: {v}' for k, v in sorted(s['answers'].items()))} |",
        f"| swap time (load, warm-up, calibrate, switch, retire), median / max | {s['swap_median_s'] * 1000:.0f} / "
        f"{s['swap_max_s'] * 1000:.0f} ms |",
        f"| RSS after the 1st / last swap (max) | {s['rss_first_mib']:.1f} / {s['rss_last_mib']:.1f} "
        f"({s['rss_max_mib']:.1f}) MiB |",
        f"| RSS growth, 1st to last swap (goal within 5 %) | {s['rss_growth_pct']:+.1f} % ({verdict}) |",
        f"| RSS growth between swaps serving the same version (2nd or 1st to last) | "
        f"{s['rss_same_version_growth_pct']:+.1f} % |", ""])


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.swaps --out DIR`: its own process, because tritonclient's OIP protos and the platform's
    cannot share one (bench/run.py's raw scenario loads the platform's)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.swaps", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--quick", action="store_true", help="6 swaps instead of 50")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = swaps(args.out, args.model_repository.resolve(), quick=args.quick)
    print(f"swaps: {summary['swaps']} swaps, {summary['requests']} requests, {len(summary['failures'])} failed, "
          f"{len(summary['wrong'])} mislabelled, RSS {summary['rss_first_mib']:.1f} -> {summary['rss_last_mib']:.1f} "
          f"MiB ({summary['rss_growth_pct']:+.1f} %)", flush=True)
    return 0 if not summary["failures"] and not summary["wrong"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
