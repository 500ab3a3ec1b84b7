"""Image bytes -> RGB pixels, and the resize + centre crop to the tokenizer's size.

Web images come in every mode Pillow knows. `decode_image` turns all of them into
uint8 RGB the same way every time:

* EXIF orientation is applied (phone photos are stored sideways);
* palette (`P`), greyscale (`L`, `1`), CMYK and YCbCr images are converted to RGB;
* transparency (`RGBA`, `LA`, `PA`, palette or greyscale with a transparent colour)
  is composited over white, so transparent pixels do not turn black;
* 16-bit greyscale (`I;16*`, `I`) is scaled to 8 bits (Pillow's own conversion
  would clip everything above 255 to white);
* animated GIF / PNG / WebP images give their first frame;
* an image with more than `max_pixels` pixels is refused before its pixels are
  decoded (a decompression bomb: a few kilobytes that expand to gigabytes).

Only raster formats whose decoders are pure Pillow are opened (`FORMATS`); in
particular not EPS, which Pillow hands to Ghostscript.

Errors are `DecodeError(reason, detail)` with a drop reason of `items.REASONS`.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats the pipeline opens (the JPEG decoder also opens MPO, cameras' multi-picture JPEGs).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
#: Pillow's own default limit, about 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

Image.init()  # registers every plugin, so `formats=` can name WEBP and TIFF


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def ignore_pillow_bomb_warnings() -> None:
    """Our own limit applies; silence Pillow's warning between its limit and twice it."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def content_hash(data: bytes | np.ndarray) -> str:
    """sha256 of image bytes (or of an array's shape and bytes)."""
    digest = hashlib.sha256()
    if isinstance(data, np.ndarray):
        digest.update(repr((data.shape, data.dtype.str)).encode())
        data = np.ascontiguousarray(data).tobytes()
    digest.update(data)
    return digest.hexdigest()


def _message(error: Exception) -> str:
    # Pillow puts object addresses in messages ("<_io.BytesIO object at 0x7f...>");
    # without them a re-run writes identical dead letters.
    return _ADDRESS.sub("", f"{type(error).__name__}: {error}")


def _os_error_reason(error: OSError) -> str:
    text = str(error).lower()
    return "truncated_image" if "truncated" in text or "broken data stream" in text else "decode_error"


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes image bytes to RGB.

    Args:
      data: the encoded image.
      max_pixels: images with more pixels are refused (`decompression_bomb`).
      draft_side: when set, JPEGs may be decoded at a reduced scale (DCT scaling, much
        faster) as long as both sides stay at least this long.

    Returns:
      (uint8 [H, W, 3] pixels, (width, height) of the stored image after EXIF
      rotation). With `draft_side` the pixels may be smaller than that size.

    Raises:
      DecodeError: `empty_file`, `not_an_image`, `decompression_bomb`,
        `truncated_image` or `decode_error`.
    """
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"not a {'/'.join(FORMATS)} image ({len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError("decompression_bomb", _message(e)) from None
    except OSError as e:
        raise DecodeError(_os_error_reason(e), _message(e)) from None
    except (SyntaxError, ValueError) as e:
        raise DecodeError("decode_error", _message(e)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("decompression_bomb", f"{width}x{height} pixels exceed the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise DecodeError("decode_error", f"image has size {width}x{height}")
    try:
        if draft_side and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (draft_side, draft_side))
        image.seek(0)  # the first frame of an animation
        image.load()
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation (PNG: known after load)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except OSError as e:
        raise DecodeError(_os_error_reason(e), _message(e)) from None
    except (SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as e:
        raise DecodeError("decode_error", _message(e)) from None
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the stored sides swap
        width, height = height, width
    return rgb, (width, height)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 [H, W, 3] (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        # 16-bit samples (0..65535) -> 8 bits, rounded. `I` images from 16-bit PNGs hold
        # the same range; clip anything beyond it.
        grey = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return np.asarray(background, np.uint8)
    return np.asarray(image.convert("RGB"), np.uint8)


def resize_and_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the centred square, resized (bicubic).

    The square is cut out first, so pixels outside it never bleed in through the
    resampling filter.
    """
    height, width = pixels.shape[:2]
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    square = pixels[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(np.ascontiguousarray(square)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.uint8)
