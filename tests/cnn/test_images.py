"""cnn_service.images: decoding within limits and pixel-tensor checks (pure logic, no server)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnn_service.images import ImageLimits, decode_image, header_size, pixels_from_tensor
from mlplatform.errors import InvalidInputError
from tests.cnn.helpers import bmp_claiming, encode, png_claiming

LIMITS = ImageLimits(height=32, width=32, max_image_bytes=1 << 20, max_image_pixels=4096 * 4096)


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A bright '1'-like stroke on black, 32x32."""
    x = np.zeros((32, 32), dtype=np.uint8)
    x[6:26, 14:18] = 255
    x[6:10, 11:14] = 180
    return x


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_lossless_formats_decode_to_the_exact_pixels(digit, fmt):
    out = decode_image(encode(digit, fmt), LIMITS)
    assert out.dtype == np.float32 and out.shape == (32, 32)
    np.testing.assert_array_equal(out, digit.astype(np.float32))


def test_jpeg_decodes_close_to_the_pixels(digit):
    out = decode_image(encode(digit, "JPEG"), LIMITS)
    assert out.shape == (32, 32) and np.abs(out - digit).mean() < 8


def test_large_jpeg_is_decoded_at_reduced_scale_close_to_a_full_decode(digit):
    data = encode(digit, "JPEG", mode="RGB", size=(2048, 1536))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L")
                      .resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    out = decode_image(data, LIMITS)
    assert out.shape == (32, 32) and np.abs(out - full).mean() < 4


def test_colour_images_become_grayscale_and_other_sizes_are_resized(digit):
    rgb_big = encode(digit, "PNG", mode="RGB", size=(96, 128))
    expected = np.asarray(Image.fromarray(digit).convert("RGB").resize((96, 128), Image.Resampling.BILINEAR)
                          .convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(decode_image(rgb_big, LIMITS), expected)
    rgba = encode(digit, "PNG", mode="RGBA")
    np.testing.assert_array_equal(decode_image(rgba, LIMITS), digit.astype(np.float32))


def test_header_size_is_read_without_decoding():
    assert header_size(png_claiming(100_000, 100_000)) == (100_000, 100_000)
    assert header_size(bmp_claiming(7, -9)) == (7, 9)
    assert header_size(b"\xff\xd8\xff\xe0 jpeg") is None


@pytest.mark.parametrize(("data", "message"), [
    (b"", "image: empty (0 bytes)"),
    (b"definitely not an image", "image: 23 bytes that are not a decodable PNG, JPEG or BMP image"),
    (png_claiming(0, 5), "image: zero-sized image (0x5 pixels)"),
    (bmp_claiming(0, 4), "image: zero-sized image (0x4 pixels)"),
    (png_claiming(100_000, 100_000),
     "image: 100000x100000 = 10000000000 pixels is over the limit of 16777216 (refused before decoding)"),
    (png_claiming(5000, 5000), "image: 5000x5000 = 25000000 pixels is over the limit"),
    (png_claiming(64, 64), "image: corrupt or truncated PNG image"),
])
def test_bad_images_get_specific_errors(data, message):
    with pytest.raises(InvalidInputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_image(data, LIMITS)


def test_bomb_is_a_tiny_file_refused_before_decoding():
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 100
    with pytest.raises(InvalidInputError, match="refused before decoding"):
        decode_image(bomb, LIMITS)


def test_byte_limit(digit):
    small = ImageLimits(height=32, width=32, max_image_bytes=100, max_image_pixels=10_000)
    data = encode(digit, "BMP")
    with pytest.raises(InvalidInputError, match=rf"^image: {len(data)} bytes is over the limit of 100 bytes"):
        decode_image(data, small)


def test_jpeg_over_the_pixel_limit_is_refused_from_its_header():
    small = ImageLimits(height=32, width=32, max_image_bytes=1 << 20, max_image_pixels=1000)
    data = encode(np.zeros((40, 40), np.uint8), "JPEG")
    with pytest.raises(InvalidInputError, match=r"^image: 40x40 = 1600 pixels is over the limit of 1000"):
        decode_image(data, small)


def test_field_name_is_in_the_message():
    with pytest.raises(InvalidInputError, match=r"^inputs\[3\]\.image: empty"):
        decode_image(b"", LIMITS, "inputs[3].image")


# -- pixel tensors ------------------------------------------------------------------------------

def test_tensors_in_every_accepted_form_give_the_same_pixels(digit):
    as_uint8 = pixels_from_tensor([32, 32], "UINT8", [], digit.tobytes(), LIMITS)
    as_fp32_raw = pixels_from_tensor([1, 32, 32], "FP32", [], digit.astype("<f4").tobytes(), LIMITS)
    as_floats = pixels_from_tensor([32, 32], "FP32", digit.ravel().astype(float).tolist(), b"", LIMITS)
    for out in (as_uint8, as_fp32_raw, as_floats):
        assert out.dtype == np.float32 and out.shape == (32, 32)
        np.testing.assert_array_equal(out, digit)


def _floats(values: np.ndarray) -> list[float]:
    return values.ravel().astype(float).tolist()


@pytest.mark.parametrize(("shape", "datatype", "floats", "raw", "message"), [
    ([32, 32], "INT64", [], b"\0" * 8192, "tensor.datatype: 'INT64' is not supported; use FP32 or UINT8"),
    ([28, 28], "UINT8", [], b"\0" * 784, r"tensor.shape: \[28, 28\] does not match the model's input \[32, 32\]"),
    ([3, 32, 32], "UINT8", [], b"\0" * 3072, r"tensor.shape: \[3, 32, 32\] does not match"),
    ([1024], "UINT8", [], b"\0" * 1024, r"tensor.shape: \[1024\] does not match"),
    ([32, 32], "UINT8", [], b"\0" * 1000,
     r"tensor.raw_contents: 1000 bytes for UINT8 shape \[32, 32\] \(1024 expected\)"),
    ([32, 32], "FP32", [], b"\0" * 1024,
     r"tensor.raw_contents: 1024 bytes for FP32 shape \[32, 32\] \(4096 expected\)"),
    ([32, 32], "FP32", [1.0] * 10, b"", r"tensor.fp32_contents: 10 values for shape \[32, 32\] \(1024 expected\)"),
    ([32, 32], "UINT8", [1.0] * 1024, b"", "tensor.fp32_contents: only for datatype FP32"),
    ([32, 32], "FP32", [1.0] * 1024, b"\0" * 4096, "tensor: set fp32_contents or raw_contents, not both"),
    ([32, 32], "FP32", [], b"", "tensor: no pixel values"),
    ([32, 32], "FP32", [0.0] * 40 + [float("nan")] + [0.0] * 983, b"",
     r"tensor: value at \[1, 8\] is nan, not a finite number"),
    ([32, 32], "FP32", [0.0] * 33 + [300.0] + [0.0] * 990, b"", r"tensor: value 300 at \[1, 1\] is outside \[0, 255\]"),
    ([32, 32], "FP32", [-1.0] * 1024, b"", r"tensor: value -1 at \[0, 0\] is outside \[0, 255\]"),
])
def test_bad_tensors_get_specific_errors(shape, datatype, floats, raw, message):
    with pytest.raises(InvalidInputError, match="^" + message):
        pixels_from_tensor(shape, datatype, floats, raw, LIMITS)
