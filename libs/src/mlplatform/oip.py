"""Open Inference Protocol (KServe v2) gRPC servicer, with Triton's ModelStreamInfer and ModelConfig.

A thin transport layer: decode tensors, hand them to the data plane (which resolves the
model, checks the inputs and predicts, as for the typed APIs), encode the outputs. Outputs
are returned as `raw_output_contents` (what tritonclient and perf_analyzer read), except to
REST clients of the gateway (its transcoder marks them with `x-gateway-content-type`) that
sent typed `contents`: they get typed `contents` back, numbers rather than base64.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator

import grpc
import numpy as np
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from inference import model_config_pb2 as mc

from mlplatform import __version__, variants
from mlplatform.dataplane import DataPlane
from mlplatform.errors import InvalidInputError, NotFoundError, ServingError, abort_on_serving_error
from mlplatform.lifecycle import ModelManager, repository_matches
from mlplatform.streaming import ordered_concurrent
from mlplatform.tensors import NUMPY_TO_OIP, OIP_TO_NUMPY

Context = grpc.aio.ServicerContext

SERVER_NAME = "mlplatform"
EXTENSIONS = ["model_configuration", "model_repository", "streaming", "parameters"]

# InferTensorContents field per OIP datatype (FP16/BF16 only travel as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


_MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)
"""The largest array numpy can describe, in bytes: a declared shape beyond it is refused (even one with a 0)."""


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """Turn one OIP input tensor (typed contents or raw bytes) into a numpy array."""
    name, datatype = tensor.name, tensor.datatype
    if datatype not in OIP_TO_NUMPY:
        raise InvalidInputError(f"input {name!r}: unknown datatype {datatype!r}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    dtype = OIP_TO_NUMPY[datatype]
    if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_ARRAY_BYTES:  # numpy could not even reshape to it
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} is too large")
    if raw is not None:
        if datatype == "BYTES":
            if count > len(raw) // 4:  # refuse before allocating room for a huge declared shape
                raise InvalidInputError(f"input {name!r}: shape {list(shape)} declares {count} BYTES elements, "
                                        f"{len(raw)} raw bytes hold at most {len(raw) // 4} (4-byte length each)")
            return _decode_raw_bytes(name, raw, count).reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(f"input {name!r}: {len(raw)} raw bytes, expected {count * dtype.itemsize} "
                                    f"for shape {list(shape)} {datatype}")
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: datatype {datatype} must be sent as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(f"input {name!r}: {len(values)} values in contents, shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _decode_raw_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """BYTES elements in raw form: each a 4-byte little-endian length, then the bytes."""
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidInputError(f"input {name!r}: raw BYTES data ends before element {i}")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidInputError(f"input {name!r}: raw BYTES element {i} is truncated")
        out[i] = raw[offset:offset + n]
        offset += n
    if offset != len(raw):
        raise InvalidInputError(f"input {name!r}: {len(raw) - offset} trailing bytes after {count} BYTES elements")
    return out


def encode_tensor(arr: np.ndarray) -> bytes:
    """Raw little-endian bytes of a numeric array (OIP raw_output_contents)."""
    if arr.dtype == np.object_:
        return b"".join(struct.pack("<I", len(b)) + b for b in (_as_bytes(x) for x in arr.ravel()))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _as_bytes(x: object) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def oip_datatype(arr: np.ndarray) -> str:
    """The OIP datatype name of a numpy array."""
    return "BYTES" if arr.dtype == np.object_ else NUMPY_TO_OIP[arr.dtype]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the models of this process over the Open Inference Protocol."""

    def __init__(self, dataplane: DataPlane, manager: ModelManager | None = None, *,
                 max_stream_in_flight: int = 64) -> None:
        self.dataplane = dataplane
        self.manager = manager
        self.max_stream_in_flight = max_stream_in_flight

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @abort_on_serving_error
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        """Whether the model (its default version, or the version asked for) takes traffic now; False for
        a version not served (yet, or any more), NOT_FOUND for a model this process never served."""
        if request.name not in self.dataplane.known:
            raise NotFoundError(f"unknown model {request.name!r}; served: {self.dataplane.names}")
        return pb.ModelReadyResponse(ready=self.dataplane.version_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @abort_on_serving_error
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self.dataplane.model(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(self.dataplane.versions(model.name))],
            platform=model.config.platform,
            inputs=[meta(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs],
            outputs=[meta(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs],
        )

    @abort_on_serving_error
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        predictor = self.dataplane.predictor(request.name, request.version)
        model = predictor.model
        cfg = model.config
        batching = cfg.batching
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=model.name,
            platform=cfg.platform,
            max_batch_size=batching.max_batch_size,
            input=[mc.ModelInput(name=s.name, data_type=mc.DataType.Value(f"TYPE_{_cfg_type(s.datatype)}"),
                                 dims=s.shape[1:]) for s in cfg.inputs],
            output=[mc.ModelOutput(name=s.name, data_type=mc.DataType.Value(f"TYPE_{_cfg_type(s.datatype)}"),
                                   dims=s.shape[1:]) for s in cfg.outputs],
            dynamic_batching=mc.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_sizes,
                max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000),
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=int((predictor.batcher.latency_budget_s or 0) * 1e6),
                    allow_timeout_override=True, max_queue_size=batching.max_queue_size),
            ),
            instance_group=[mc.ModelInstanceGroup(
                kind=mc.ModelInstanceGroup.KIND_GPU if model.device == "gpu" else mc.ModelInstanceGroup.KIND_CPU,
                count=batching.max_concurrent_batches,
            )],
            default_model_filename=cfg.artifact,
            parameters={k: mc.ModelParameter(string_value=str(v)) for k, v in cfg.parameters.items()
                        if k in variants.PARAMETER_KEYS},
        ))

    @abort_on_serving_error
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining(), _json_client(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def handle(index: int, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context.time_remaining()))
            except ServingError as err:
                return pb.ModelStreamInferResponse(error_message=f"{err.code.name}: {err.message}",
                                                   infer_response=pb.ModelInferResponse(id=request.id))

        async for response in ordered_concurrent(requests, handle, max_in_flight=self.max_stream_in_flight):
            yield response

    # -- Triton's model repository extension -------------------------------------------------

    @abort_on_serving_error
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        manager = self._manager(request.repository_name)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state=e.state.value, reason=e.reason)
            for e in manager.index(ready_only=request.ready)])

    @abort_on_serving_error
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context
                                  ) -> pb.RepositoryModelLoadResponse:
        manager = self._manager(request.repository_name)
        manager.check_control("RepositoryModelLoad")
        config = None
        for key, value in request.parameters.items():
            if key != "config":
                raise InvalidInputError(f"parameters.{key}: not supported at load (only \"config\"; publish model "
                                        "files as a version folder in the repository)")
            if value.WhichOneof("parameter_choice") != "string_param":
                raise InvalidInputError("parameters.config: must be a string_param holding JSON")
            config = value.string_param
        await manager.load(request.model_name, config)
        return pb.RepositoryModelLoadResponse()

    @abort_on_serving_error
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context
                                    ) -> pb.RepositoryModelUnloadResponse:
        manager = self._manager(request.repository_name)
        manager.check_control("RepositoryModelUnload")
        await manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _manager(self, repository_name: str) -> ModelManager:
        if self.manager is None:
            raise ServingError("this server has no model repository", grpc.StatusCode.UNIMPLEMENTED)
        if not repository_matches(self.manager.repository.root, repository_name):
            raise NotFoundError(f"unknown repository {repository_name!r}; this server's is "
                                f"{self.manager.repository.root.name!r}")
        return self.manager

    async def _infer(self, request: pb.ModelInferRequest, timeout_s: float | None,
                     json_client: bool = False) -> pb.ModelInferResponse:
        with self.dataplane.serving(request.model_name, request.model_version) as predictor:  # NOT_FOUND first
            model = predictor.model
            predictor.admit(1, timeout_s)  # an overloaded model refuses before decoding anything
            if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
                raise InvalidInputError(f"{len(request.raw_input_contents)} raw_input_contents for "
                                        f"{len(request.inputs)} inputs")
            inputs: dict[str, np.ndarray] = {}
            for i, tensor in enumerate(request.inputs):
                if tensor.name in inputs:
                    raise InvalidInputError(f"input {tensor.name!r} is given twice")
                raw = request.raw_input_contents[i] if request.raw_input_contents else None
                inputs[tensor.name] = decode_tensor(tensor, raw)
            wanted = [o.name for o in request.outputs]
            prediction = await self.dataplane.infer(predictor, inputs, outputs=wanted, timeout_s=timeout_s)
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        response.parameters["cached_rows"].int64_param = int(prediction.cached.sum())
        response.parameters["fallback_rows"].int64_param = int(prediction.fallback.sum())
        names = wanted or [s.name for s in model.outputs]
        # OIP: raw contents for every output or for none; FP16/BF16 only travel raw.
        typed = json_client and not request.raw_input_contents and all(
            oip_datatype(prediction.outputs[n]) in _CONTENTS_FIELD for n in names)
        for name in names:
            arr = prediction.outputs[name]
            out = response.outputs.add(name=name, datatype=oip_datatype(arr), shape=arr.shape)
            if typed:
                getattr(out.contents, _CONTENTS_FIELD[out.datatype]).extend(_plain(arr))
            else:
                response.raw_output_contents.append(encode_tensor(arr))
        return response


def _json_client(context: Context) -> bool:
    """The call is a REST request transcoded by the gateway (which records the client's content type)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-gateway-content-type":
            return not str(value).startswith("application/grpc")
    return False


def _plain(arr: np.ndarray) -> list:
    """A tensor's elements as Python values for typed contents (BYTES as bytes)."""
    if arr.dtype == np.object_:
        return [_as_bytes(x) for x in arr.ravel()]
    return arr.ravel().tolist()


def _cfg_type(datatype: str) -> str:
    """OIP datatype -> Triton config DataType suffix (BYTES is TYPE_STRING there)."""
    return "STRING" if datatype == "BYTES" else datatype
