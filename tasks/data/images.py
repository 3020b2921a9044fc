"""Image bytes <-> PIL <-> tensors, with hard limits (decompression bombs, truncated files).

Records store images as encoded bytes + size (``schema.IMAGE_STRUCT``). Decoding always goes through
``decode_image``, which caps the pixel count (PIL's ``MAX_IMAGE_PIXELS`` guard turned into an error),
forces a full load (so a truncated file fails here, not later), and converts to RGB.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024  # hard cap on decoded size (w*h), far above any recipe image
# MoonViT was initialised from SigLIP, whose inputs are normalised to [-1, 1]
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image within the limits; the message says why."""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(e: BaseException) -> str:
    """Exception text without memory addresses, so quarantine reasons are reproducible run to run."""
    return f"{type(e).__name__}: {_ADDRESS.sub('', str(e))}"


def encode_image(img: Image.Image, fmt: str = "png") -> dict[str, Any]:
    """PIL image -> ``IMAGE_STRUCT`` dict (deterministic bytes for PNG)."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpeg", "webp"):
        raise ValueError(f"image format must be png, jpeg or webp, got {fmt!r}")
    buf = io.BytesIO()
    img = img.convert("RGB")
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="WEBP", quality=90)
    return {"data": buf.getvalue(), "width": img.width, "height": img.height, "format": fmt}


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image, fully loaded; ``ImageDecodeError`` on anything wrong."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageDecodeError(f"image has size {w}x{h}")
            if w * h > max_pixels:
                raise ImageDecodeError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
            img.load()  # forces a full decode: truncated data fails here
            return img.convert("RGB")
    except ImageDecodeError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise ImageDecodeError(f"undecodable image: {_describe(e)}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only (cheap); ``ImageDecodeError`` if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"unreadable image header: {_describe(e)}") from None


def to_tensor(img: Image.Image, normalize: bool = True) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W), normalised with SigLIP's mean/std when ``normalize``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if normalize:
        t = (t - PIXEL_MEAN) / PIXEL_STD
    return t
