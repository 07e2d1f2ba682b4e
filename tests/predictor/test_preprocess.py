"""The shared preprocessing: what every image goes through before the model sees it."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vsearch.predictor.preprocess import (
    InvalidImage,
    Limits,
    PreprocessConfig,
    apply_crop,
    bytes_to_array,
    decode_image,
    image_to_array,
    parse_crop,
    parse_crop_text,
)

CFG = PreprocessConfig(image_size=32, resize_size=36)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_pil_mode_becomes_rgb_of_the_input_size(mode):
    rgb = Image.fromarray(gradient())
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.int32) * 257)
    elif mode == "F":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.float32) / 255.0)
    else:
        img = rgb.convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    decoded = decode_image(encode(img, fmt))
    assert decoded.mode == "RGB"
    assert decoded.size == (64, 48)
    arr = bytes_to_array(encode(img, fmt), CFG)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert np.isfinite(arr).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (8, 1))
    decoded = np.asarray(decode_image(encode(Image.fromarray(ramp))))
    # A clipping conversion would make almost everything 255; scaling keeps the ramp.
    assert decoded[0, 0, 0] == 0 and decoded[0, -1, 0] == 255
    assert 100 < decoded[0, 32, 0] < 160


def test_transparent_pixels_are_composed_on_white():
    rgba = np.zeros((10, 10, 4), np.uint8)   # fully transparent black
    decoded = np.asarray(decode_image(encode(Image.fromarray(rgba))))
    assert (decoded == 255).all()


def test_exif_orientation_is_applied():
    # A landscape image stored with "rotate 90" in EXIF is upright portrait once decoded.
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)                  # left half red, right half blue
    arr[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                           # orientation: rotate 90 CW to display
    data = encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    assert decoded.size == (40, 80)            # width, height swapped
    top, bottom = np.asarray(decoded)[5, 20], np.asarray(decoded)[-5, 20]
    assert top[0] > 200 and top[2] < 60        # red on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("data, reason", [
    (b"", "0 bytes"),
    (b"hello, I am text", "not an image"),
])
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(InvalidImage, match=reason):
        decode_image(data)


def test_truncated_file_is_refused(photo_bytes):
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(photo_bytes[0][: len(photo_bytes[0]) // 3])


def test_pixel_and_byte_limits():
    big = encode(Image.new("L", (3000, 3000)))          # 9 Mpx, compresses to a few KB
    with pytest.raises(InvalidImage, match="over the limit of 4000000 pixels"):
        decode_image(big, Limits(max_pixels=4_000_000))
    with pytest.raises(InvalidImage, match="over the limit of 100 bytes"):
        decode_image(big, Limits(max_bytes=100))
    assert decode_image(big).size == (3000, 3000)       # default limits accept it


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    png = bytearray(encode(Image.new("1", (8, 8))))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.parametrize("side", [10_000, 60_000])
def test_decompression_bomb_header_is_refused_before_decoding(side):
    # 100 Mpx trips our own limit; 3.6 Gpx trips PIL's guard inside open(): both are a 400.
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(png_claiming(side, side))


@pytest.mark.parametrize("crop", [[0, 0, 1.5, 1], [-0.1, 0, 0.5, 0.5], [0.5, 0, 0.5, 1],
                                  [0.6, 0.1, 0.2, 0.9], [0, 0, 1], ["a", 0, 1, 1],
                                  [float("nan"), 0, 1, 1]])
def test_bad_crop_boxes_are_refused(crop):
    with pytest.raises(InvalidImage, match="crop"):
        parse_crop(crop)


def test_crop_text_and_empty_crop():
    assert parse_crop_text("0.1, 0.2, 0.5, 0.9") == (0.1, 0.2, 0.5, 0.9)
    assert parse_crop_text("") is None and parse_crop(None) is None and parse_crop([]) is None
    with pytest.raises(InvalidImage):
        parse_crop_text("0.1,0.2,x,0.9")


def test_crop_applies_to_the_original_image_before_resizing():
    img = Image.fromarray(gradient(200, 100))
    crop = (0.25, 0.5, 0.75, 1.0)
    assert apply_crop(img, crop).size == (100, 50)
    pre_cropped = img.crop((50, 50, 150, 100))
    np.testing.assert_array_equal(image_to_array(img, CFG, crop), image_to_array(pre_cropped, CFG))


def test_normalisation_uses_the_models_mean_and_std():
    white = Image.new("RGB", (50, 50), (255, 255, 255))
    cfg = PreprocessConfig(image_size=8, resize_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    arr = image_to_array(white, cfg)
    np.testing.assert_allclose(arr[:, 0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


def test_real_photos_decode(photo_bytes):
    for data in photo_bytes:
        arr = bytes_to_array(data, PreprocessConfig())
        assert arr.shape == (3, 224, 224)
