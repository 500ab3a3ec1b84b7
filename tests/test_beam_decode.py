"""beam_pipelines.decode: every image mode to RGB, the right error reasons, resize + crop."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import beam_helpers as h
from beam_pipelines import decode


def _png48(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">" + "H" * 3 * width, *(list(rgb16) * width))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def test_rgb_jpeg_and_png():
    image = h.smooth_image(0)
    pixels, size = decode.decode_image(h.encode(image, "PNG"))
    np.testing.assert_array_equal(pixels, image)
    assert size == (64, 48)
    pixels, _ = decode.decode_image(h.encode(image, "JPEG", quality=95))
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 64, 3)
    assert np.abs(pixels.astype(int) - image).mean() < 3


def test_palette_with_transparency_composites_on_white():
    pixels, size = decode.decode_image(h.palette_png_with_transparency())
    assert size == (40, 32)
    np.testing.assert_array_equal(pixels[:, :20], np.broadcast_to([255, 0, 0], (32, 20, 3)))
    np.testing.assert_array_equal(pixels[:, 20:], np.full((32, 20, 3), 255))


def test_rgba_and_la_alpha():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[:4, :, 3] = 255  # top opaque blue, bottom transparent
    pixels, _ = decode.decode_image(h.encode(rgba, "PNG"))
    np.testing.assert_array_equal(pixels[0, 0], [0, 0, 200])
    np.testing.assert_array_equal(pixels[7, 0], [255, 255, 255])
    la = Image.new("LA", (8, 8), (10, 255))
    buffer = io.BytesIO()
    la.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode.decode_image(buffer.getvalue())[0][0, 0], [10, 10, 10])


def test_cmyk_jpeg():
    pixels, _ = decode.decode_image(h.cmyk_jpeg())
    assert np.abs(pixels.astype(int) - [0, 255, 255]).max() <= 2


def test_sixteen_bit_png_scaled_not_clipped():
    pixels, _ = decode.decode_image(h.png16_grey(0x8080))
    np.testing.assert_array_equal(pixels, np.full((32, 40, 3), 128))
    assert decode.decode_image(h.png16_grey(65535))[0].min() == 255
    assert decode.decode_image(h.png16_grey(300))[0].max() == 1  # Pillow's convert would give 255
    pixels, _ = decode.decode_image(_png48(8, 4, (65535, 0x8080, 0)))
    np.testing.assert_array_equal(pixels[0, 0], [255, 128, 0])


def test_animated_gif_first_frame():
    pixels, size = decode.decode_image(h.animated_gif())
    assert size == (40, 32)
    np.testing.assert_array_equal(pixels, np.broadcast_to([0, 255, 0], (32, 40, 3)))


def test_greyscale_and_bilevel():
    for mode, value, expected in (("L", 77, 77), ("1", 1, 255)):
        buffer = io.BytesIO()
        Image.new(mode, (8, 6), value).save(buffer, format="PNG")
        pixels, _ = decode.decode_image(buffer.getvalue())
        assert pixels.shape == (6, 8, 3) and (pixels == expected).all()


def test_exif_orientation_applied():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white (stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", exif=exif, quality=95)
    pixels, size = decode.decode_image(buffer.getvalue())
    assert size == (20, 40) and pixels.shape == (40, 20, 3)
    assert pixels[:15].mean() > 200 and pixels[-15:].mean() < 50  # white now on top


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"plain text, named .jpg", "not_an_image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_an_image"),  # EPS is never opened
])
def test_errors(data, reason):
    with pytest.raises(decode.DecodeError) as error:
        decode.decode_image(data)
    assert error.value.reason == reason


def test_truncated_jpeg():
    data = h.encode(h.smooth_image(3), "JPEG")
    with pytest.raises(decode.DecodeError) as error:
        decode.decode_image(data[: len(data) // 2])
    assert error.value.reason == "truncated_image"
    assert "0x" not in error.value.detail  # no object addresses: dead letters are reproducible


def test_decompression_bomb_refused_before_decoding():
    data = h.encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(decode.DecodeError) as error:
        decode.decode_image(data, max_pixels=9_999)
    assert error.value.reason == "decompression_bomb"
    decode.decode_image(data, max_pixels=10_000)


def test_draft_keeps_both_sides_at_least_the_target():
    data = h.encode(h.smooth_image(1, 480, 640), "JPEG")
    pixels, size = decode.decode_image(data, draft_side=100)
    assert size == (640, 480)
    assert min(pixels.shape[:2]) >= 100 and pixels.shape[0] < 480


def test_resize_and_crop_takes_the_centre_square():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 200  # the centre square
    out = decode.resize_and_crop(image, 20)
    assert out.shape == (20, 20, 3) and (out == 200).all()
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[30:60] = 50
    assert (decode.resize_and_crop(tall, 30) == 50).all()
    assert decode.resize_and_crop(h.smooth_image(0, 16, 16), 16) is not None


def test_content_hash_is_of_the_bytes():
    assert decode.content_hash(b"abc") == decode.content_hash(b"abc") != decode.content_hash(b"abd")
    a = np.zeros((2, 3, 3), np.uint8)
    assert decode.content_hash(a) != decode.content_hash(a.reshape(3, 2, 3))
