"""Models served by a runtime: `OnnxModel` (ONNX Runtime) and `RuntimeModel` (TorchScript, ONNX Runtime or
torch.export, as the config's runtime variant says: any servable format of the optimisation toolkit).
With a `config.json` alone, either serves a model over the Open Inference Protocol (the generic model
service); a service subclasses them for model-specific validation, pre/post-processing and fallbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform import metrics
from mlplatform.config import ModelConfig
from mlplatform.model import Model, Tensors
from mlplatform.repository import ModelVersion
from mlplatform.runtimes.onnx import OnnxRuntimeSession, resolve_provider_options
from mlplatform.runtimes.torch_export import ExportedProgramSession
from mlplatform.runtimes.torchscript import TorchScriptSession
from mlplatform.variants import AUTO, VariantChoice, choose_variant, gpu_available

log = logging.getLogger(__name__)


def open_onnx_session(model: Model, path: Path, provider_options: Mapping[str, Mapping[str, Any]] | None,
                      inputs: list[str], outputs: list[str], declared_by: str) -> OnnxRuntimeSession:
    """An ONNX Runtime session with the model config's threads and providers; ValueError when the artifact's
    inputs differ from `inputs` or it lacks one of `outputs` (`declared_by` names where those come from)."""
    rt = model.config.runtime
    session = OnnxRuntimeSession(path, intra_op_threads=rt.intra_op_threads, inter_op_threads=rt.inter_op_threads,
                                 providers=rt.providers, provider_options=provider_options)
    if sorted(session.input_names) != sorted(inputs):
        raise ValueError(f"{model.name} v{model.version}: artifact inputs {session.input_names} "
                         f"differ from {declared_by} inputs {inputs}")
    missing = set(outputs) - set(session.output_names)
    if missing:
        raise ValueError(f"{model.name} v{model.version}: artifact lacks outputs {sorted(missing)}")
    return session


class OnnxModel(Model):
    """A model served by ONNX Runtime, configured from the version's config."""

    session: OnnxRuntimeSession

    def _load(self) -> None:
        self.session = open_onnx_session(self, self.model_version.artifact_path, self.provider_options(),
                                         [s.name for s in self.inputs], [s.name for s in self.outputs], "config")

    def provider_options(self) -> dict[str, dict]:
        """The config's `runtime.options.provider_options` resolved for this version (cache paths under its
        directory, TensorRT profile for batch 1 / `tensorrt_opt_batch_size` / max_batch_size)."""
        return resolved_provider_options(self, self.config.runtime.options.get("provider_options"))

    @property
    def device(self) -> str:
        return self.session.device

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually got."""
        return self.session.providers

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self.session.run(inputs)

    async def unload(self) -> None:
        await super().unload()
        self.__dict__.pop("session", None)


def resolved_provider_options(model: Model, options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict]:
    """ONNX Runtime provider options resolved for `model`'s version (see `resolve_provider_options`; the TensorRT
    profile comes from the config's input shapes)."""
    rt = model.config.runtime
    return resolve_provider_options(
        options, model_dir=model.model_version.path, inputs=[(s.name, s.shape) for s in model.inputs],
        max_batch_size=model.max_batch_size, opt_batch_size=rt.options.get("tensorrt_opt_batch_size"),
    )


BACKENDS = ("torchscript", "onnxruntime", "torch_export")
PLATFORM_BACKENDS = {"pytorch_libtorch": "torchscript", "onnxruntime_onnx": "onnxruntime",
                     "pytorch_export": "torch_export"}
BACKEND_PLATFORMS = {backend: platform for platform, backend in PLATFORM_BACKENDS.items()}


def runtime_variant(config: ModelConfig, name: str | None = None, *,
                    gpu: bool | None = None) -> tuple[str, str, dict[str, Any]]:
    """(variant name, backend, variant options) the config selects, or `name` overrides (see `select_runtime`)."""
    choice, backend, variant = select_runtime(config, name, gpu=gpu)
    return choice.name, backend, variant


def select_runtime(config: ModelConfig, name: str | None = None, *,
                   gpu: bool | None = None) -> tuple[VariantChoice, str, dict[str, Any]]:
    """The variant to serve (with why), its backend and its options.

    `runtime.options.variants` maps a variant name (e.g. "torchscript", "onnx", "onnx_int8") to
    {"backend": "torchscript" | "onnxruntime", "artifact": file, ...}; `runtime.options.variant`
    picks one, or `"auto"`: chosen from the hardware and the build's measurements
    (`mlplatform.variants.choose_variant`; `gpu` says whether a GPU is present, None: detect it).
    `name` overrides the config (it may be "auto" too). Without variants the backend follows the
    platform and the artifact is `artifact`.
    """
    opts = config.runtime.options
    variants: dict[str, dict[str, Any]] = opts.get("variants") or {}
    if not variants:
        backend = PLATFORM_BACKENDS.get(config.platform)
        if backend is None:
            raise ValueError(f"platform {config.platform!r} has no runtime; known: {sorted(PLATFORM_BACKENDS)}")
        if name not in (None, "", backend):
            raise ValueError(f"runtime variant {name!r} is not in the config (no runtime.options.variants)")
        return VariantChoice(backend, f"platform {config.platform}", "config"), backend, {"artifact": config.artifact}
    requested = name or opts.get("variant") or next(iter(variants))
    if requested == AUTO:
        choice = choose_variant(variants, opts.get("auto"), gpu_available() if gpu is None else gpu)
    elif name:
        choice = VariantChoice(requested, "named by the service's runtime setting", "override")
    else:
        choice = VariantChoice(requested, "runtime.options.variant in config.json", "config")
    if choice.name not in variants:
        raise ValueError(f"runtime variant {choice.name!r} is not one of {sorted(variants)}")
    variant = dict(variants[choice.name])
    if variant.get("backend") not in BACKENDS:
        raise ValueError(f"runtime variant {choice.name!r}: backend must be one of {BACKENDS}")
    variant.setdefault("artifact", config.artifact)
    return choice, variant["backend"], variant


class RuntimeModel(Model):
    """A model run by the runtime its config chooses: TorchScript (FP16 on CUDA, FP32 on CPU) or ONNX Runtime.

    The runtime's tensors may differ from the served ones (e.g. text in, token ids to the
    runtime): a variant's `inputs` / `outputs` name the runtime's tensors, in call order for
    TorchScript; by default they are the config's.
    """

    session: OnnxRuntimeSession | TorchScriptSession | ExportedProgramSession

    def __init__(self, version: ModelVersion, runtime: str | None = None) -> None:
        super().__init__(version)
        self.variant_choice, self.backend, self.variant = select_runtime(self.config, runtime)
        self.runtime_name = self.variant_choice.name
        self.runtime_path = version.path / self.variant["artifact"]
        if not self.runtime_path.is_file():
            raise ValueError(f"{self.name} v{self.version}: runtime {self.runtime_name!r} artifact "
                             f"{self.variant['artifact']!r} is missing")
        self.runtime_inputs: list[str] = list(self.variant.get("inputs") or [s.name for s in self.inputs])
        self.runtime_outputs: list[str] = list(self.variant.get("outputs") or [s.name for s in self.outputs])
        # What clients see (OIP metadata and ModelConfig: platform, default_model_filename, parameters) is
        # the variant actually served, not the config's default.
        self.config = self.config.model_copy(update={
            "platform": BACKEND_PLATFORMS[self.backend], "artifact": self.variant["artifact"],
            "parameters": {**self.config.parameters, **self.variant_choice.as_parameters()},
        })
        log.info("%s v%s: runtime variant %s (%s: %s)", self.name, self.version, self.runtime_name,
                 self.variant_choice.selection, self.variant_choice.reason)

    def _load(self) -> None:
        rt = self.config.runtime
        options = {**rt.options, **self.variant}
        if self.backend == "torchscript":
            self.session = TorchScriptSession(
                self.runtime_path, input_names=self.runtime_inputs, output_names=self.runtime_outputs,
                intra_op_threads=rt.intra_op_threads, inter_op_threads=rt.inter_op_threads, options=options,
            )
            return
        if self.backend == "torch_export":
            self.session = ExportedProgramSession(
                self.runtime_path, input_names=self.runtime_inputs, output_names=self.runtime_outputs,
                intra_op_threads=rt.intra_op_threads, kind=options.get("kind", "exported_program"))
            return
        self.session = open_onnx_session(self, self.runtime_path, self.provider_options(options),
                                         self.runtime_inputs, self.runtime_outputs, "runtime")

    def provider_options(self, options: Mapping[str, Any] | None = None) -> dict[str, dict]:
        """ONNX Runtime provider options of the served variant (`options`: the config's runtime options merged
        with the variant's), resolved for this version when the runtime takes the config's inputs."""
        provider_options = (options if options is not None else {**self.config.runtime.options, **self.variant}
                            ).get("provider_options")
        if self.runtime_inputs == [s.name for s in self.inputs]:
            return resolved_provider_options(self, provider_options)
        return dict(provider_options or {})

    @property
    def device(self) -> str:
        return self.session.device

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime providers in use, `torchscript:<device>:<precision>` or `torch_export:<kind>`."""
        if isinstance(self.session, TorchScriptSession):
            return [f"torchscript:{self.session.choice.device}:{self.session.precision}"]
        if isinstance(self.session, ExportedProgramSession):
            return [f"torch_export:{self.session.kind}"]
        return self.session.providers

    async def load(self) -> None:
        """Load, then report the served variant (`inference_model_variant`)."""
        await super().load()
        metrics.MODEL_VARIANT.labels(model=self.name, version=self.version, variant=self.runtime_name,
                                     backend=self.backend, device=self.device,
                                     selection=self.variant_choice.selection).set(1)

    def run_runtime(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run the runtime on its own tensors (blocking)."""
        return self.session.run(inputs)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self.run_runtime(inputs)

    async def unload(self) -> None:
        await super().unload()
        self.__dict__.pop("session", None)
