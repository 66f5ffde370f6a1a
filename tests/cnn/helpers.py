"""Images and requests for the cnn tests: lossless PNGs, other formats, crafted bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from cnn.v1 import cnn_pb2 as pb
from PIL import Image


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str = "L", size: tuple[int, int] | None = None) -> bytes:
    """`pixels` [H, W] (0-255) as an image file; optionally converted to `mode` and resized first."""
    img = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L")
    if mode != "L":
        img = img.convert(mode)
    if size is not None:
        img = img.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP whose header says width x height (e.g. 0 wide), with a few pixel bytes after it."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def tensor(pixels: np.ndarray, datatype: str = "UINT8", shape: list[int] | None = None,
           as_floats: bool = False) -> pb.PixelTensor:
    """A PixelTensor of `pixels` [H, W]: UINT8 raw bytes, FP32 raw bytes or FP32 repeated floats."""
    shape = list(pixels.shape) if shape is None else shape
    if as_floats:
        return pb.PixelTensor(shape=shape, datatype="FP32", fp32_contents=np.asarray(pixels, np.float32).ravel())
    dtype = np.uint8 if datatype == "UINT8" else np.dtype("<f4")
    return pb.PixelTensor(shape=shape, datatype=datatype, raw_contents=np.asarray(pixels).astype(dtype).tobytes())


def top_labels(classification: pb.Classification) -> list[str]:
    return [c.label for c in classification.classes]


def load_heldout(model_repository) -> tuple[np.ndarray, np.ndarray]:
    """The build's held-out split (cnn v1): uint8 images [N, 32, 32] and their labels."""
    data = np.load(model_repository / "cnn" / "1" / "heldout.npz")
    return data["images"], data["labels"]


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _blank() -> np.ndarray:
    return np.zeros((32, 32), dtype=np.uint8)


def _tensor_json(shape: list[int], datatype: str, raw: bytes) -> dict:
    return {"shape": shape, "datatype": datatype, "raw_contents": b64(raw)}


# Bad Predict requests as proto-JSON (the REST body; parsed with json_format for gRPC) -> the message's start.
BAD_PREDICT: list[tuple[str, dict, str]] = [
    ("undecodable", {"image": b64(b"this is not an image")},
     "image: 20 bytes that are not a decodable PNG, JPEG or BMP image"),
    ("empty", {"image": ""}, "image: empty (0 bytes)"),
    ("zero-sized", {"image": b64(png_claiming(0, 5))}, "image: zero-sized image (0x5 pixels)"),
    ("decompression bomb", {"image": b64(png_claiming(100_000, 100_000))},
     "image: 100000x100000 = 10000000000 pixels is over the limit of 16777216 (refused before decoding)"),
    ("over the byte limit", {"image": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20))},
     "image: 1048584 bytes is over the limit of 1048576 bytes"),
    ("truncated", {"image": b64(png_claiming(64, 64))}, "image: corrupt or truncated PNG image"),
    ("wrong tensor shape", {"tensor": _tensor_json([28, 28], "UINT8", b"\0" * 784)},
     "tensor.shape: [28, 28] does not match the model's input [32, 32] (or [1, 32, 32])"),
    ("wrong tensor datatype", {"tensor": _tensor_json([32, 32], "INT64", b"\0" * 8192)},
     "tensor.datatype: 'INT64' is not supported; use FP32 or UINT8"),
    ("tensor size", {"tensor": _tensor_json([32, 32], "FP32", b"\0" * 1024)},
     "tensor.raw_contents: 1024 bytes for FP32 shape [32, 32] (4096 expected)"),
    ("pixel out of range", {"tensor": {"shape": [32, 32], "datatype": "FP32", "fp32_contents": [256.0] * 1024}},
     "tensor: value 256 at [0, 0] is outside [0, 255]"),
    ("k too big", {"tensor": _tensor_json([32, 32], "UINT8", _blank().tobytes()), "top_k": 11},
     "top_k: 11 is out of range 1..10"),
    ("k negative", {"tensor": _tensor_json([32, 32], "UINT8", _blank().tobytes()), "top_k": -1},
     "top_k: -1 is out of range 1..10"),
    ("no input", {"top_k": 1}, "input: set image (PNG, JPEG or BMP bytes) or tensor (pixels)"),
]

_GOOD_ITEM = {"tensor": _tensor_json([32, 32], "UINT8", _blank().tobytes())}
BAD_BATCH: list[tuple[str, dict, str]] = [
    ("empty batch", {"inputs": []}, "inputs: empty batch, at least one item is required"),
    ("batch over the limit", {"inputs": [_GOOD_ITEM] * 33}, "inputs: 33 items, at most 32 per batch"),
    ("k out of range", {"inputs": [_GOOD_ITEM], "top_k": 12}, "top_k: 12 is out of range 1..10"),
]
