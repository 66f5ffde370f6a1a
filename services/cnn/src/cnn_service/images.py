"""Request images -> model pixels: decode PNG/JPEG/BMP or check a raw pixel tensor, within limits.

Both paths give float32 pixels [height, width] in 0..255 (bright ink on a dark background), the
model's input before its in-graph normalisation. Every problem raises `InvalidInputError` naming the
field. Image size is read from the file header and checked against the pixel limit before anything
is decoded, so a small file claiming a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlplatform.errors import InvalidInputError

FORMATS = ("PNG", "JPEG", "BMP")
TENSOR_DATATYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageLimits:
    """The model's input size and what a request may send (from the model config's parameters)."""

    height: int
    width: int
    max_image_bytes: int
    max_image_pixels: int
    pixel_min: float = 0.0
    pixel_max: float = 255.0


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or BMP header without decoding; None for other formats."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"BM") and len(data) >= 26:
        header = struct.unpack("<I", data[14:18])[0]
        if header == 12 and len(data) >= 22:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return struct.unpack("<HH", data[18:22])
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)  # negative height: top-down rows
    return None


def _check_size(width: int, height: int, limits: ImageLimits, field: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{field}: zero-sized image ({width}x{height} pixels)")
    if width * height > limits.max_image_pixels:
        raise InvalidInputError(
            f"{field}: {width}x{height} = {width * height} pixels is over the limit of {limits.max_image_pixels} "
            "(refused before decoding)")


def decode_image(data: bytes, limits: ImageLimits, field: str = "image") -> np.ndarray:
    """Decode an encoded image to float32 pixels [height, width] at the model's input size."""
    if len(data) == 0:
        raise InvalidInputError(f"{field}: empty (0 bytes); expected a PNG, JPEG or BMP file")
    if len(data) > limits.max_image_bytes:
        raise InvalidInputError(f"{field}: {len(data)} bytes is over the limit of {limits.max_image_bytes} bytes")
    claimed = header_size(data)
    if claimed is not None:
        _check_size(*claimed, limits, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            _check_size(img.width, img.height, limits, field)
            if img.format == "JPEG":  # decode at a reduced DCT scale when the image is much larger (faster)
                img.draft("L", (limits.width, limits.height))
            img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInputError(f"{field}: over the limit of {limits.max_image_pixels} pixels "
                                "(refused before decoding)") from None
    except UnidentifiedImageError:
        raise InvalidInputError(f"{field}: {len(data)} bytes that are not a decodable PNG, JPEG or BMP image"
                                ) from None
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise InvalidInputError(f"{field}: corrupt or truncated {_format_name(data)} image: {exc}") from None
    img = ImageOps.exif_transpose(img) if img.format == "JPEG" else img
    gray = img if img.mode == "L" else img.convert("L")
    if gray.size != (limits.width, limits.height):
        gray = gray.resize((limits.width, limits.height), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32)


def _format_name(data: bytes) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    return "image"


def pixels_from_tensor(shape: Sequence[int], datatype: str, fp32_contents: Sequence[float], raw_contents: bytes,
                       limits: ImageLimits, field: str = "tensor") -> np.ndarray:
    """Check a raw pixel tensor (shape [H, W] or [1, H, W], FP32 or UINT8) -> float32 pixels [H, W]."""
    if datatype not in TENSOR_DATATYPES:
        raise InvalidInputError(f"{field}.datatype: {datatype!r} is not supported; use FP32 or UINT8")
    h, w = limits.height, limits.width
    dims = list(shape)
    if dims not in ([h, w], [1, h, w]):
        raise InvalidInputError(f"{field}.shape: {dims} does not match the model's input [{h}, {w}] "
                                f"(or [1, {h}, {w}])")
    n = h * w
    if fp32_contents and raw_contents:
        raise InvalidInputError(f"{field}: set fp32_contents or raw_contents, not both")
    if fp32_contents:
        if datatype != "FP32":
            raise InvalidInputError(f"{field}.fp32_contents: only for datatype FP32 (datatype is {datatype}); "
                                    "send UINT8 pixels in raw_contents")
        if len(fp32_contents) != n:
            raise InvalidInputError(f"{field}.fp32_contents: {len(fp32_contents)} values for shape {dims} "
                                    f"({n} expected)")
        values = np.asarray(fp32_contents, dtype=np.float32)
    elif raw_contents:
        dtype = TENSOR_DATATYPES[datatype]
        if len(raw_contents) != n * dtype.itemsize:
            raise InvalidInputError(f"{field}.raw_contents: {len(raw_contents)} bytes for {datatype} shape {dims} "
                                    f"({n * dtype.itemsize} expected)")
        values = np.frombuffer(raw_contents, dtype=dtype).astype(np.float32)
    else:
        raise InvalidInputError(f"{field}: no pixel values; set fp32_contents or raw_contents")
    pixels = values.reshape(h, w)
    problem = pixel_problem(pixels, limits)
    if problem:
        raise InvalidInputError(f"{field}: {problem}")
    return pixels


def pixel_problem(pixels: np.ndarray, limits: ImageLimits) -> str | None:
    """Why pixel values are unusable (the first bad one, by position), or None."""
    bad = ~np.isfinite(pixels)
    if bad.any():
        pos = np.unravel_index(int(np.argmax(bad)), pixels.shape)
        return f"value at {list(map(int, pos))} is {pixels[pos]}, not a finite number"
    out = (pixels < limits.pixel_min) | (pixels > limits.pixel_max)
    if out.any():
        pos = np.unravel_index(int(np.argmax(out)), pixels.shape)
        return (f"value {float(pixels[pos]):g} at {list(map(int, pos))} is outside "
                f"[{limits.pixel_min:g}, {limits.pixel_max:g}]")
    return None
