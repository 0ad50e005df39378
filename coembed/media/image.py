"""Images of any format and mode decoded to RGB, with a pixel limit against decompression bombs."""

from __future__ import annotations

import io
import os
from typing import Any, Literal

import numpy as np
from PIL import Image

from coembed.errors import BadItem, OverLimit
from coembed.media.context import FROM_CONTEXT, FromContext, current_max_image_pixels
from coembed.media.items import MediaRef, VideoFrame, as_array, check_file
from coembed.media.video import read_video_frame


def load_image(item: Any, max_pixels: int | None | Literal[FromContext.FROM_CONTEXT] = FROM_CONTEXT) -> Image.Image:
    """Decode ``item`` to an RGB :class:`PIL.Image.Image`.

    ``item`` may be a path, bytes, a :class:`VideoFrame`, a PIL image, a numpy
    ``[H, W]``/``[H, W, C]`` uint8 array, a dict ``{"bytes": ..., "path": ...}``
    (the ``datasets`` Image feature undecoded) or a :class:`MediaRef`. Any mode
    (grayscale, RGBA, CMYK, palette, 16-bit) is converted to RGB. Images above
    ``max_pixels`` (default: the enclosing :func:`decoding` block's limit, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`; ``None``: no limit) raise :class:`OverLimit`.
    """
    if max_pixels is FROM_CONTEXT:
        max_pixels = current_max_image_pixels()
    if isinstance(item, MediaRef):
        item = item.fetch()
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, VideoFrame):
        image = read_video_frame(item)
    elif isinstance(item, dict) and ("bytes" in item or "path" in item):
        data = item.get("bytes")
        return load_image(data if data else item["path"], max_pixels)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise BadItem("empty image bytes")
        image = _open_image(io.BytesIO(bytes(item)), max_pixels)
    elif isinstance(item, (str, os.PathLike)):
        image = _open_image(check_file(item), max_pixels)
    else:
        array = as_array(item)
        if array is None:
            raise BadItem(f"unsupported image input of type {type(item).__name__}")
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise OverLimit(f"image too large: {image.width * image.height} pixels, above the limit of {max_pixels}")
    return to_rgb(image)


def _open_image(source: Any, max_pixels: int | None) -> Image.Image:
    try:
        image = Image.open(source)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise OverLimit(f"image too large: {image.width * image.height} pixels, "
                            f"above the limit of {max_pixels}")
        image.load()
    except BadItem:
        raise
    except Image.DecompressionBombError as exc:
        raise OverLimit("image too large: above PIL's decompression-bomb pixel limit") from exc
    except Exception as exc:
        raise BadItem(f"not a readable image ({type(exc).__name__})") from exc
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit greyscale is scaled, alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        scale = 65535.0 if peak > 255 else 255.0
        array = np.clip(array / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        array = (array - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


