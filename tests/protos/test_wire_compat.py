"""Our Open Inference Protocol protos are wire-compatible with the ones tritonclient ships.

Both are compared as descriptors, without importing our generated stubs (they would
clash with tritonclient's in protobuf's default pool): every message, field number,
type and label, every enum value and every RPC we declare must equal Triton's.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2

from tests.support.procs import ROOT

DESCRIPTORS = ROOT / "protos" / "gen" / "descriptors.pb"


def _ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes())
    return {f.name: f for f in fds.file}


def _tritons() -> list[descriptor_pb2.FileDescriptorProto]:
    from tritonclient.grpc import model_config_pb2, service_pb2

    out = []
    for mod in (service_pb2, model_config_pb2):
        fd = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fd)
        out.append(fd)
    return out


def _index(files) -> tuple[dict, dict, dict]:
    messages, enums, methods = {}, {}, {}

    def walk(msgs, prefix):
        for m in msgs:
            name = f"{prefix}.{m.name}"
            messages[name] = m
            for e in m.enum_type:
                enums[f"{name}.{e.name}"] = e
            walk(m.nested_type, name)

    for f in files:
        if f.package != "inference":
            continue
        walk(f.message_type, ".inference")
        for e in f.enum_type:
            enums[f".inference.{e.name}"] = e
        for s in f.service:
            for m in s.method:
                methods[f"{s.name}.{m.name}"] = m
    return messages, enums, methods


def _field_sig(f: descriptor_pb2.FieldDescriptorProto) -> tuple:
    return (f.number, f.type, f.label, f.type_name)


def test_every_message_field_enum_and_rpc_matches_triton():
    ours_m, ours_e, ours_rpc = _index(_ours().values())
    theirs_m, theirs_e, theirs_rpc = _index(_tritons())
    assert len(ours_m) > 20
    for name, msg in ours_m.items():
        assert name in theirs_m, f"{name} is not in Triton's protos"
        theirs = {f.name: f for f in theirs_m[name].field}
        for field in msg.field:
            assert field.name in theirs, f"{name}.{field.name} is not in Triton's {name}"
            assert _field_sig(field) == _field_sig(theirs[field.name]), f"{name}.{field.name} differs"
        oneofs = [o.name for o in msg.oneof_decl]
        assert oneofs == [o.name for o in theirs_m[name].oneof_decl][: len(oneofs)], name
    for name, enum in ours_e.items():
        theirs = {v.name: v.number for v in theirs_e[name].value}
        assert {v.name: v.number for v in enum.value}.items() <= theirs.items(), name
    for name, rpc in ours_rpc.items():
        assert name in theirs_rpc, name
        t = theirs_rpc[name]
        assert (rpc.input_type, rpc.output_type, rpc.client_streaming, rpc.server_streaming) == (
            t.input_type, t.output_type, t.client_streaming, t.server_streaming), name
    required = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                "ModelStreamInfer", "ModelConfig", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
    assert {n.split(".")[1] for n in ours_rpc} == required


def test_inference_request_messages_cover_the_whole_spec():
    """The KServe v2 messages are complete (not a subset): same field sets as Triton's."""
    ours_m, _, _ = _index(_ours().values())
    theirs_m, _, _ = _index(_tritons())
    for name in (".inference.ModelInferRequest", ".inference.ModelInferResponse",
                 ".inference.ModelInferRequest.InferInputTensor", ".inference.InferTensorContents",
                 ".inference.InferParameter", ".inference.ModelMetadataResponse",
                 ".inference.ModelStreamInferResponse"):
        assert {f.name for f in ours_m[name].field} == {f.name for f in theirs_m[name].field}, name


def test_descriptor_set_has_the_rest_routes_for_envoy():
    from google.api import annotations_pb2, http_pb2

    files = _ours()
    fraud = files["fraud/v1/fraud.proto"]
    assert "google/api/annotations.proto" in files and "google/api/http.proto" in files  # --include_imports
    routes = {}
    for method in fraud.service[0].method:
        opts = method.options
        # Re-parse the options with the extension registered to read google.api.http.
        parsed = descriptor_pb2.MethodOptions.FromString(opts.SerializeToString())
        if parsed.HasExtension(annotations_pb2.http):
            rule: http_pb2.HttpRule = parsed.Extensions[annotations_pb2.http]
            routes[method.name] = (rule.post, rule.body)
    assert routes == {"Predict": ("/api/v1/fraud", "*"), "PredictBatch": ("/api/v1/fraud:batch", "*")}
