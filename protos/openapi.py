"""The REST API's OpenAPI 3 document, from the protos' `google.api.http` annotations.

The gateway transcodes REST to gRPC from the same annotations (Envoy's gRPC-JSON transcoder, with
`preserve_proto_field_names` and `always_print_primitive_fields`), so this document says exactly what the
gateway accepts and answers: one operation per HTTP binding, request bodies and responses as the proto3 JSON
mapping of the messages, the path parameters, bearer-token security, and the gateway's error body
(`{code, message}`: the gRPC status code and its message) for every documented error status.
`protos/generate.py` writes it to protos/gen/openapi.json at setup; the gateway serves it at
`/api/v1/openapi.json`; docs/api/openapi.json is the published copy (a test keeps it current).
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.api import annotations_pb2 as http_annotations  # registers the `http` option on MethodOptions
from google.protobuf import descriptor_pb2

OPENAPI_PATH = "/api/v1/openapi.json"
TITLE = "mlplatform REST API"

F = descriptor_pb2.FieldDescriptorProto
_INT32 = {F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_UINT32, F.TYPE_FIXED32}
_INT64 = {F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64, F.TYPE_UINT64, F.TYPE_FIXED64}
_UNSIGNED = {F.TYPE_UINT32, F.TYPE_FIXED32, F.TYPE_UINT64, F.TYPE_FIXED64}

ERRORS = {
    "400": "Invalid request: a field is missing, malformed or out of range (the message names it)",
    "401": "Missing, expired or invalid bearer token",
    "403": "Not allowed through the gateway",
    "404": "Unknown model, version or path",
    "413": "Request body over the gateway's limit",
    "429": "Rate limit of this API key exceeded, or the model's queue is full (Retry-After says when to retry)",
    "503": ("No healthy replica, the model is not ready, or it failed on this request (not served: retry, "
            "see Retry-After)"),
    "504": "The model did not answer within the deadline",
}


def _comments(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[tuple[str, tuple[int, ...]], str]:
    """(file, location path) -> leading comment, for descriptions."""
    out = {}
    for f in files:
        for loc in f.source_code_info.location:
            text = (loc.leading_comments or loc.trailing_comments).strip()
            if text:
                out[(f.name, tuple(loc.path))] = " ".join(line.strip() for line in text.splitlines())
    return out


class _Builder:
    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.messages: dict[str, tuple[descriptor_pb2.DescriptorProto, str, tuple[int, ...]]] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments = _comments(files)
        self.schemas: dict[str, dict[str, Any]] = {}
        for f in files:
            for i, m in enumerate(f.message_type):
                self._index(m, f"{f.package}.{m.name}" if f.package else m.name, f.name, (4, i))
            for e in f.enum_type:
                self.enums[f"{f.package}.{e.name}" if f.package else e.name] = e

    def _index(self, m: descriptor_pb2.DescriptorProto, full: str, file: str, path: tuple[int, ...]) -> None:
        self.messages[full] = (m, file, path)
        for i, nested in enumerate(m.nested_type):
            self._index(nested, f"{full}.{nested.name}", file, (*path, 3, i))
        for e in m.enum_type:
            self.enums[f"{full}.{e.name}"] = e

    def ref(self, full: str, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        """A $ref to the message's schema (built on first use); `exclude`: fields bound to the path."""
        name = full + ("_Body" if exclude else "")
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursive messages
            self.schemas[name] = self._message(full, exclude)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, full: str, exclude: frozenset[str]) -> dict[str, Any]:
        m, file, path = self.messages[full]
        props = {}
        for i, field in enumerate(m.field):
            if field.name in exclude:
                continue
            schema = self._field(m, field)
            doc = self.comments.get((file, (*path, 2, i)))
            if doc:
                schema = {**schema, "description": doc} if "$ref" not in schema else {"allOf": [schema],
                                                                                        "description": doc}
            props[field.name] = schema
        # Envoy's transcoder drops JSON fields a message does not define, with no option to refuse them
        # (envoyproxy/envoy#46623): say so rather than promise a 400 the gateway does not give.
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": True}
        doc = self.comments.get((file, path))
        if doc:
            out["description"] = doc
        return out

    def _field(self, parent: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto
               ) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            entry = next((n for n in parent.nested_type if n.options.map_entry
                          and field.type_name.endswith(f".{n.name}")), None)
            if entry is not None:  # map<K, V>: a JSON object, keys as strings
                return {"type": "object", "additionalProperties": self._field(entry, entry.field[1])}
        single = self._scalar(field)
        return {"type": "array", "items": single} if field.label == F.LABEL_REPEATED else single

    def _scalar(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        t = field.type
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return {"type": "number", "format": "double" if t == F.TYPE_DOUBLE else "float"}
        if t in _INT32:
            return {"type": "integer", "format": "int32", **({"minimum": 0} if t in _UNSIGNED else {})}
        if t in _INT64:  # proto3 JSON: a decimal string (numbers are accepted too)
            pattern = "^[0-9]+$" if t in _UNSIGNED else "^-?[0-9]+$"
            return {"oneOf": [{"type": "integer", "format": "int64", **({"minimum": 0} if t in _UNSIGNED else {})},
                              {"type": "string", "pattern": pattern}]}
        if t == F.TYPE_BOOL:
            return {"type": "boolean"}
        if t == F.TYPE_STRING:
            return {"type": "string"}
        if t == F.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        if t == F.TYPE_ENUM:
            enum = self.enums[field.type_name.lstrip(".")]
            return {"type": "string", "enum": [v.name for v in enum.value]}
        return self.ref(field.type_name.lstrip("."))


def _bindings(rule: http_annotations.http_pb2.HttpRule) -> list[tuple[str, str, str]]:
    """(method, path template, body) of a rule and its additional bindings."""
    out = []
    for r in [rule, *rule.additional_bindings]:
        kind = r.WhichOneof("pattern")
        if kind and kind != "custom":
            out.append((kind, getattr(r, kind), r.body))
    return out


def build(descriptor_set: bytes, version: str = "1.0.0") -> dict[str, Any]:
    """The OpenAPI 3.0 document for every HTTP-annotated method of the descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    builder = _Builder(list(fds.file))
    paths: dict[str, dict[str, Any]] = {}
    errors = {code: {"description": text, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for code, text in ERRORS.items()}
    for f in fds.file:
        for si, service in enumerate(f.service):
            full_service = f"{f.package}.{service.name}" if f.package else service.name
            for mi, method in enumerate(service.method):
                if not method.options.HasExtension(http_annotations.http):
                    continue
                rule = method.options.Extensions[http_annotations.http]
                doc = builder.comments.get((f.name, (6, si, 2, mi)), "")
                for n, (verb, template, body) in enumerate(_bindings(rule)):
                    params = re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", template)
                    path = re.sub(r"\{([^}=]+)=[^}]*\}", r"{\1}", template)
                    op: dict[str, Any] = {
                        "operationId": f"{full_service}.{method.name}" + (f".{n}" if n else ""),
                        "summary": f"{full_service}/{method.name}",
                        "tags": [full_service],
                        "parameters": [{"name": p, "in": "path", "required": True,
                                        "schema": {"type": "string", "minLength": 1}} for p in params],
                        "responses": {"200": {"description": "The prediction", "content": {"application/json": {
                            "schema": builder.ref(method.output_type.lstrip("."))}}}, **errors},
                    }
                    if doc:
                        op["description"] = doc
                    if body == "*":
                        op["requestBody"] = {"required": True, "content": {"application/json": {
                            "schema": builder.ref(method.input_type.lstrip("."), frozenset(params))}}}
                    paths.setdefault(path, {})[verb] = op
    paths[OPENAPI_PATH] = {"get": {
        "operationId": "openapi", "summary": "This document", "tags": ["gateway"], "security": [],
        "responses": {"200": {"description": "The OpenAPI document", "content": {"application/json": {
            "schema": {"type": "object"}}}}}}}
    schemas = dict(sorted(builder.schemas.items()))
    schemas["Error"] = {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "integer", "description": "The gRPC status code (3 INVALID_ARGUMENT, 5 NOT_FOUND, ...)"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": TITLE, "version": version, "description": (
            "REST through the mlplatform gateway (Envoy), transcoded to the services' gRPC APIs. Every call but "
            "this document needs `Authorization: Bearer <JWT>`; each API key is rate-limited per minute. "
            "Errors carry the gRPC status code and a message naming the offending field. Fields a message does "
            "not define are ignored (the gateway's transcoder drops them): check the spelling of optional fields "
            "such as `model_version`.")},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
                       "schemas": schemas},
    }


def dumps(document: dict[str, Any]) -> str:
    """The document as the gateway serves it and docs/api/openapi.json holds it."""
    return json.dumps(document, indent=2, sort_keys=False) + "\n"
