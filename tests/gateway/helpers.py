"""HTTP and gRPC calls through the gateway, for the gateway tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
         token: str | None = None, timeout: float = 10.0) -> HttpResponse:
    """One HTTP/1.1 request; 4xx/5xx are returned, not raised."""
    hdrs = {"content-type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return HttpResponse(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def post(gateway, path: str, body: bytes | dict | None, token: str | None = None, **kw) -> HttpResponse:
    return http("POST", f"http://{gateway.target}{path}", body, token=token, **kw)


def bearer(token: str) -> list[tuple[str, str]]:
    """gRPC call metadata carrying a token."""
    return [("authorization", f"Bearer {token}")]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises (fails the test when it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded; an error was expected")


def held_certificate_serials(gateway) -> set[int]:
    """The serial numbers of the certificates (listener's and client's) Envoy holds now, from admin /certs."""
    held = json.loads(gateway.admin("/certs"))["certificates"]
    return {int(c["serial_number"], 16) for entry in held for c in entry.get("cert_chain", [])}
