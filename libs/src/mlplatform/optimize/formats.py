"""Every format the toolkit makes from a Subject, each with a runner that returns class probabilities.

An `Artefact` is one row of the report: a file (or none), how it was made, and `runner(threads)`,
a function from numpy feeds to probabilities [N, C] with that many CPU threads. A format that
cannot be made here keeps its row with `status` saying why ("not available on this machine: ...",
"failed: ..."), so the report shows what was tried.
"""

from __future__ import annotations

import copy
import gzip
import io
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.optimize import quantize
from mlplatform.optimize.subject import Feeds, Subject

Runner = Callable[[Feeds], np.ndarray]
ONNX_OPSET = 17
OK = "ok"


@dataclass
class Artefact:
    """One format: its file under the output directory, how it was made, and a runner factory."""

    name: str
    description: str
    family: str
    file: str | None = None
    runner: Callable[[int], Runner] | None = None
    status: str = OK
    backend: str | None = None
    """The serving backend that loads it (`onnxruntime`, `torchscript`, `torch_export`), None: not servable."""
    target: str = "cpu"
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    """Time to make the format."""

    @property
    def ok(self) -> bool:
        return self.status == OK


def _pick(subject: Subject, result: Any) -> np.ndarray:
    """The probabilities output of a torch call (one tensor or a tuple in `output_names` order)."""
    results = result if isinstance(result, (tuple, list)) else (result,)
    t = results[subject.output_names.index(subject.probabilities)] if len(results) > 1 else results[0]
    return t.detach().float().cpu().numpy()


def torch_runner(subject: Subject, fn: Callable[..., Any]) -> Callable[[int], Runner]:
    """Runner factory for a torch callable: threads set process-wide, inputs in `input_names` order."""
    import torch

    def make(threads: int) -> Runner:
        def run(feeds: Feeds) -> np.ndarray:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return _pick(subject, fn(*(torch.from_numpy(feeds[n]) for n in subject.input_names)))
        return run
    return make


def ort_session(model: bytes | Path, threads: int, providers: Sequence[Any] = ("CPUExecutionProvider",)) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, sess_options=so, providers=list(providers))


def ort_runner(subject: Subject, model: bytes | Path,
               providers: Sequence[Any] = ("CPUExecutionProvider",)) -> Callable[[int], Runner]:
    """Runner factory for an ONNX (or .ort) model in ONNX Runtime."""
    def make(threads: int) -> Runner:
        session = ort_session(model, threads, providers)

        def run(feeds: Feeds) -> np.ndarray:
            return session.run([subject.probabilities], {n: feeds[n] for n in subject.input_names})[0]
        return run
    return make


class Maker:
    """Makes the formats of one subject into `out` (a directory), timing each and keeping failures as rows."""

    def __init__(self, subject: Subject, out: Path, *, calibration_rows: int = 128, probe_rows: int = 64,
                 finetune_steps: int = 60, seed: int = 0, only: Sequence[str] | None = None) -> None:
        self.subject = subject
        self.only = set(only or ()) | ({"eager_fp32", "onnx"} if only else set())
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.calibration_rows = calibration_rows
        self.probe_rows = probe_rows
        self.finetune_steps = finetune_steps
        self.seed = seed
        self.artefacts: dict[str, Artefact] = {}
        self.onnx_bytes: bytes | None = None

    def write(self, name: str, data: bytes) -> str:
        (self.out / name).write_bytes(data)
        return name

    def size(self, art: Artefact) -> int | None:
        return (self.out / art.file).stat().st_size if art.file and (self.out / art.file).is_file() else None

    def add(self, name: str, description: str, family: str, make: Callable[[Artefact], None], **kw: Any) -> Artefact:
        """Run `make(artefact)` (which fills file / runner / notes); an exception becomes the row's status."""
        art = Artefact(name, description, family, **kw)
        if self.only and name not in self.only:
            art.status = "not selected (--only)"
            self.artefacts[name] = art
            return art
        start = time.perf_counter()
        try:
            make(art)
        except Exception as exc:  # a format that fails here is reported, the others still run
            art.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            art.runner = None
        art.seconds = round(time.perf_counter() - start, 2)
        self.artefacts[name] = art
        return art

    # ------------------------------------------------------------------ native and torch.export

    def native(self) -> None:
        import torch

        s = self.subject

        def state_dict(art: Artefact) -> None:
            buf = io.BytesIO()
            torch.save(s.net.state_dict(), buf)
            art.file = self.write("model.state_dict.pt", buf.getvalue())
            net = copy.deepcopy(s.net)
            net.load_state_dict(torch.load(self.out / art.file, map_location="cpu", weights_only=True))
            art.runner = torch_runner(s, net.eval())

        def torchscript(art: Artefact) -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                with torch.inference_mode():
                    traced = torch.jit.trace(s.net, s.example(), check_trace=False)
                buf = io.BytesIO()
                torch.jit.save(traced, buf)
                art.file = self.write("model.torchscript.pt", buf.getvalue())
                module = torch.jit.load(str(self.out / art.file))
            art.notes["deprecation_warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught
                                                        if issubclass(w.category, DeprecationWarning)})
            art.runner = torch_runner(s, module)

        self.add("eager_fp32", "PyTorch eager FP32 (state_dict), the reference", "native", state_dict)
        self.add("torchscript", "TorchScript (torch.jit.trace), deprecated in torch 2.13", "native", torchscript,
                 backend="torchscript")

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """torch.export dynamic shapes from the subject's ONNX dynamic axes (same names, same Dim)."""
        from torch.export import Dim

        dims: dict[str, Any] = {}
        return tuple({axis: dims.setdefault(label, Dim.DYNAMIC) for axis, label in
                      self.subject.dynamic_axes.get(n, {}).items()} for n in self.subject.input_names)

    def exported(self, aoti: bool) -> None:
        import torch

        s = self.subject
        holder: dict[str, Any] = {}

        def export(art: Artefact) -> None:
            with torch.inference_mode():
                ep = torch.export.export(s.net, s.example(), dynamic_shapes=self.dynamic_shapes())
            path = self.out / "model.pt2"
            torch.export.save(ep, str(path))
            art.file = path.name
            holder["ep"] = ep
            module = torch.export.load(str(path)).module()
            art.notes["graph_nodes"] = sum(1 for _ in ep.graph.nodes)
            art.runner = torch_runner(s, module)

        self.add("torch_export", "torch.export ExportedProgram (.pt2), dynamic batch"
                 + (" and sequence" if any(len(a) > 1 for a in s.dynamic_axes.values()) else ""),
                 "export", export, backend="torch_export")
        if not aoti:
            self.add("aoti", "AOTInductor (compiled .pt2 package)", "export",
                     lambda art: _skip(art, "skipped (--quick or --no-aoti): compiling takes minutes here"))
            return

        def compile_aoti(art: Artefact) -> None:
            if "ep" not in holder:
                raise RuntimeError("torch.export failed, nothing to compile")
            path = self.out / "model.aoti.pt2"
            torch._inductor.aoti_compile_and_package(holder["ep"], package_path=str(path))
            art.file = path.name
            art.runner = torch_runner(s, torch._inductor.aoti_load_package(str(path)))

        self.add("aoti", "AOTInductor (torch.export compiled to a native .so, packaged .pt2)", "export",
                 compile_aoti)

    # ------------------------------------------------------------------ ONNX family

    def export_onnx(self, net: Any) -> bytes:
        """ONNX bytes of `net` with the subject's dynamic axes (TorchScript-based exporter: the dynamo one needs
        onnxscript, not installed)."""
        import onnx
        import torch

        s = self.subject
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, s.example(), buf, input_names=s.input_names, output_names=s.output_names,
                              dynamic_axes=s.dynamic_axes, opset_version=ONNX_OPSET, dynamo=False,
                              do_constant_folding=True)
        model = onnx.load_from_string(buf.getvalue())
        onnx.checker.check_model(model)
        return buf.getvalue()

    def calibration(self) -> tuple[list[Feeds], list[Feeds]]:
        """Calibration and probe batches (16 rows each) from the training data."""
        s = self.subject
        n_cal = min(self.calibration_rows, s.train_size)
        n_probe = min(self.probe_rows, max(0, s.train_size - n_cal))
        cal = [s.train(list(range(i, min(i + 16, n_cal)))) for i in range(0, n_cal, 16)]
        probe = [s.train(list(range(i, min(i + 16, n_cal + n_probe)))) for i in range(n_cal, n_cal + n_probe, 16)]
        return cal, probe or cal

    def onnx_family(self, verify: Callable[[Runner], float], tolerance: float) -> None:
        s = self.subject

        def fp32(art: Artefact) -> None:
            self.onnx_bytes = self.export_onnx(s.net)
            art.file = self.write("model.onnx", self.onnx_bytes)
            art.runner = ort_runner(s, self.out / art.file)
            diff = verify(art.runner(2))
            art.notes.update(max_abs_diff_vs_pytorch=diff, tolerance=tolerance,
                             dynamic_axes={k: list(v.values()) for k, v in s.dynamic_axes.items()})
            if diff > tolerance:
                raise ValueError(f"ONNX Runtime differs from PyTorch by {diff:.3g} > {tolerance:g}")

        self.add("onnx", "ONNX (opset 17, dynamic axes), FP32, verified in ONNX Runtime", "onnx", fp32,
                 backend="onnxruntime")

        def optimised(art: Artefact) -> None:
            assert self.onnx_bytes is not None, "ONNX export failed"
            if s.fuse is not None:
                fused, ops = s.fuse(self.onnx_bytes)
                art.notes["fused_operators"] = ops
            else:
                import onnxruntime as ort

                with tempfile.TemporaryDirectory() as tmp:
                    so = ort.SessionOptions()
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                    so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
                    ort.InferenceSession(self.onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
                    fused = (Path(tmp) / "opt.onnx").read_bytes()
                art.notes["operators"] = _op_counts(fused)
            art.file = self.write("model.ortopt.onnx", fused)
            art.runner = ort_runner(s, self.out / art.file)

        self.add("onnx_ortopt", s.fusion_name, "onnx", optimised, backend="onnxruntime")

        def dynamic(art: Artefact) -> None:
            assert self.onnx_bytes is not None, "ONNX export failed"
            data = quantize.quantize_dynamic_int8(self.onnx_bytes, per_channel=True, op_types=s.int8_ops)
            art.file = self.write("model.int8-dynamic.onnx", data)
            art.runner = ort_runner(s, self.out / art.file)
            art.notes["op_types"] = s.int8_ops

        self.add("onnx_int8_dynamic", "INT8 dynamic (weights per channel, activations per batch at run time)",
                 "int8", dynamic, backend="onnxruntime")

        def static(art: Artefact) -> None:
            assert self.onnx_bytes is not None, "ONNX export failed"
            cal, probe = self.calibration()
            result = quantize.quantize_static_qdq(self.onnx_bytes, cal, probe, op_types=s.int8_ops)
            art.file = self.write("model.int8-static.onnx", result.model)
            art.runner = ort_runner(s, self.out / art.file)
            art.notes.update(
                calibration=f"{sum(len(next(iter(f.values()))) for f in cal)} training rows, MinMax; "
                            f"probe {sum(len(next(iter(f.values()))) for f in probe)} further training rows",
                format="QDQ, activations uint8 per tensor, weights int8 per channel", op_types=s.int8_ops,
                sensitive_threshold_db=quantize.SENSITIVE_SQNR_DB, excluded=result.excluded,
                quantized_nodes=len(result.sqnr_db), activation_sqnr_db=result.sqnr_db)

        self.add("onnx_int8_static", "INT8 static QDQ, per channel, calibrated on training data, sensitive "
                 "nodes FP32", "int8", static, backend="onnxruntime")

    # ------------------------------------------------------------------ pruning

    def finetune(self, net: Any, steps: int) -> None:
        """`steps` AdamW steps on random training batches (seeded, BatchNorm statistics frozen); net back in eval
        mode."""
        import torch

        s = self.subject
        torch.manual_seed(self.seed)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=s.learning_rate)
        gen = torch.Generator().manual_seed(self.seed)
        net.train()
        for m in net.modules():  # BatchNorm keeps the trained statistics: small batches would only add noise
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        for _ in range(steps):
            idx = torch.randint(0, s.train_size, (s.batch_size,), generator=gen).tolist()
            loss = s.loss(net, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()

    def pruning(self, evaluate: Callable[[Runner], float], amount: float = 0.5) -> None:
        from torch import nn
        from torch.nn.utils import prune

        s = self.subject

        def unstructured(art: Artefact) -> None:
            net = copy.deepcopy(s.net)
            params = [(m, "weight") for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
            before = evaluate(torch_runner(s, net.eval())(2))
            self.finetune(net, self.finetune_steps)
            for module, name in params:
                prune.remove(module, name)
            zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
            total = sum(m.weight.numel() for m, _ in params)
            after = evaluate(torch_runner(s, net)(2))
            data = self.export_onnx(net)
            art.file = self.write("model.pruned50.onnx", data)
            art.runner = ort_runner(s, self.out / art.file)
            dense = self.onnx_bytes or data
            art.notes.update(
                method=f"global L1 magnitude over every Conv/Linear weight ({len(params)} tensors), "
                       f"{amount:.0%}, then {self.finetune_steps} fine-tune steps with the mask fixed",
                sparsity=round(zeros / total, 4), accuracy_fp32=evaluate(torch_runner(s, s.net)(2)),
                accuracy_pruned_before_finetune=before, accuracy_pruned_after_finetune=after,
                gzip_bytes=len(gzip.compress(data, 6)), gzip_bytes_dense=len(gzip.compress(dense, 6)))

        self.add("pruned_50_unstructured", f"{amount:.0%} global magnitude sparsity + short fine-tune (ONNX, dense "
                 "kernels)", "pruning", unstructured, backend="onnxruntime")

        def structured(art: Artefact) -> None:
            net, what = s.structured(copy.deepcopy(s.net))
            net.eval()
            before = evaluate(torch_runner(s, net)(2))
            self.finetune(net, self.finetune_steps)
            after = evaluate(torch_runner(s, net)(2))
            data = self.export_onnx(net)
            art.file = self.write("model.pruned-structured.onnx", data)
            art.runner = ort_runner(s, self.out / art.file)
            art.notes.update(method=f"{what}, then {self.finetune_steps} fine-tune steps",
                             parameters=sum(p.numel() for p in net.parameters()),
                             parameters_fp32=sum(p.numel() for p in s.net.parameters()),
                             accuracy_pruned_before_finetune=before, accuracy_pruned_after_finetune=after)

        self.add("pruned_structured", "structured pruning (smaller dense network) + short fine-tune (ONNX)",
                 "pruning", structured, backend="onnxruntime")

    # ------------------------------------------------------------------ GPU and edge

    def tensorrt(self) -> None:
        s = self.subject

        def trt(art: Artefact) -> None:
            import onnxruntime as ort

            from mlplatform.variants import gpu_available

            available = ort.get_available_providers()
            if "TensorrtExecutionProvider" not in available or not gpu_available():
                _skip(art, "not available on this machine: no CUDA GPU / TensorRT (ONNX Runtime providers "
                           f"{', '.join(available)})")
                return
            assert self.onnx_bytes is not None, "ONNX export failed"
            cache = self.out / "trt_cache"
            cache.mkdir(exist_ok=True)
            providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache)}),
                         "CUDAExecutionProvider"]
            art.file = "model.onnx"
            art.runner = ort_runner(s, self.out / "model.onnx", providers)
            got = ort_session(self.out / "model.onnx", 1, providers).get_providers()
            if got[0] != "TensorrtExecutionProvider":
                raise RuntimeError(f"ONNX Runtime did not take TensorRT: providers {got}")
            art.notes["providers"] = got

        self.add("onnx_tensorrt_fp16", "TensorRT FP16 through ONNX Runtime's TensorRT provider", "gpu", trt,
                 backend="onnxruntime", target="gpu")

    def edge(self) -> None:
        s = self.subject

        def ort_format(source: str) -> Callable[[Artefact], None]:
            def make(art: Artefact) -> None:
                src = self.artefacts.get(source)
                if src is None or not src.ok or not src.file:
                    raise RuntimeError(f"{source} was not made")
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / src.file).write_bytes((self.out / src.file).read_bytes())
                    proc = subprocess.run(
                        [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                         str(Path(tmp) / src.file), "--output_dir", str(Path(tmp) / "ort"),
                         "--optimization_style", "Fixed"],
                        capture_output=True, text=True, timeout=600)
                    made = sorted((Path(tmp) / "ort").glob("*.ort"))
                    if proc.returncode or not made:
                        raise RuntimeError(f"convert_onnx_models_to_ort failed: {proc.stderr.strip()[-300:]}")
                    art.file = self.write(Path(src.file).with_suffix(".ort").name, made[0].read_bytes())
                    config = sorted((Path(tmp) / "ort").glob("*.config"))
                    if config:
                        art.notes["required_operators"] = self.write(
                            Path(src.file).with_suffix(".required_operators.config").name, config[0].read_bytes())
                art.runner = ort_runner(s, self.out / art.file)
                art.notes["from"] = source
            return make

        self.add("ort_mobile_fp32", "ONNX Runtime mobile format (.ort, FP32, fixed optimisations)", "edge",
                 ort_format("onnx"), backend="onnxruntime")
        self.add("ort_mobile_int8", "ONNX Runtime mobile format (.ort) of the static INT8 model", "edge",
                 ort_format("onnx_int8_static"), backend="onnxruntime")
        for name, desc, why in EDGE_NOT_DONE:
            self.add(name, desc, "edge", lambda art, why=why: _skip(art, why))


EDGE_NOT_DONE = (
    ("tflite", "TFLite / LiteRT",
     "not done: the PyTorch->TFLite converter (ai-edge-torch) pins its own torch and TensorFlow builds, which "
     "conflict with the platform's torch==2.13.0; LiteRT's runtime alone has no converter"),
    ("coreml", "Core ML (.mlpackage)",
     "not done: coremltools can convert on Linux, but Core ML models only run on Apple OSes (no prediction, "
     "hence no accuracy or latency, on Linux); not installed"),
)


def _skip(art: Artefact, why: str) -> None:
    art.status = why


def _op_counts(onnx_bytes: bytes) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load_from_string(onnx_bytes).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
