"""MoonViT preprocessing as pure tensor functions (Kimi-VL Sec. 2.1; numbers from REFERENCE.md).

- Size rule: an image of H x W pixels spans n = (H/14) * (W/14) patches. If n > 4096 it is downscaled by
  sqrt(4096 / n) (aspect ratio kept), then zero-padded bottom/right to a multiple of 28 = patch * merge so the
  projector's 2 x 2 pixel shuffle always sees even grids. Each side must stay < 512 patches.
- Padding can add up to 27 pixels per side, which could push the padded grid back over the limit; the scale
  is then shrunk a little more until the padded grid holds <= max_patches (the limit is on what the model
  sees).
- Resizing is ``F.interpolate(mode="bicubic", antialias=True)`` (antialias only matters when downscaling;
  upscaling never happens here). Inputs are float (C, H, W) tensors, already normalised by the caller: no
  PIL in model code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _padded(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def smart_resize_hw(
    height: int,
    width: int,
    patch: int = 14,
    merge: int = 2,
    max_patches: int = 4096,
    max_side_patches: int = 512,
) -> tuple[int, int]:
    """(new_h, new_w) in pixels after downscaling and padding; both are multiples of patch * merge.

    The image content is resized to ``resized_hw(...)`` and padded with zeros to this size.
    """
    new_h, new_w = _padded_hw(*resized_hw(height, width, patch, merge, max_patches), patch * merge)
    if new_h // patch >= max_side_patches or new_w // patch >= max_side_patches:
        raise ValueError(
            f"image of height={height}, width={width} gives a {new_h // patch} x {new_w // patch} patch grid; "
            f"each side must be < max_side_patches={max_side_patches} patches"
        )
    return new_h, new_w


def _padded_hw(h: int, w: int, multiple: int) -> tuple[int, int]:
    return _padded(h, multiple), _padded(w, multiple)


def resized_hw(
    height: int, width: int, patch: int = 14, merge: int = 2, max_patches: int = 4096
) -> tuple[int, int]:
    """(h, w) of the image content before padding: the input size, or downscaled by sqrt(max/n)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image height and width must be > 0, got height={height}, width={width}")
    if patch <= 0 or merge <= 0 or max_patches < merge * merge:
        raise ValueError(
            f"need patch > 0, merge > 0, max_patches >= merge^2; got patch={patch}, merge={merge}, "
            f"max_patches={max_patches}"
        )
    unit = patch * merge

    def n_padded(h: int, w: int) -> int:
        ph, pw = _padded_hw(h, w, unit)
        return (ph // patch) * (pw // patch)

    n = (height / patch) * (width / patch)
    if n <= max_patches and n_padded(height, width) <= max_patches:
        return height, width
    scale = math.sqrt(max_patches / n) if n > max_patches else 1.0
    while True:
        h, w = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
        npad = n_padded(h, w)
        if npad <= max_patches:
            return h, w
        # shrink by the overshoot (plus a hair so the loop always makes progress)
        scale *= min(math.sqrt(max_patches / npad), 0.999)


def image_to_patches(
    image: torch.Tensor,
    patch: int = 14,
    merge: int = 2,
    max_patches: int = 4096,
    max_side_patches: int = 512,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(C, H, W) float image -> (patches (h*w, C, patch, patch) row-major, (h, w) grid with h, w even)."""
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float (C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    c, height, width = image.shape
    pad_h, pad_w = smart_resize_hw(height, width, patch, merge, max_patches, max_side_patches)
    h_img, w_img = resized_hw(height, width, patch, merge, max_patches)
    if (h_img, w_img) != (height, width):
        image = F.interpolate(
            image[None], size=(h_img, w_img), mode="bicubic", align_corners=False, antialias=True
        )[0]
    image = F.pad(image, (0, pad_w - w_img, 0, pad_h - h_img))  # zeros on the right and bottom
    gh, gw = pad_h // patch, pad_w // patch
    # (C, gh*p, gw*p) -> (C, gh, p, gw, p) -> (gh, gw, C, p, p) -> (gh*gw, C, p, p)
    patches = image.view(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, c, patch, patch)
    return patches, (gh, gw)


def pack_images(images: list[torch.Tensor], **kwargs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patchify and concatenate images -> (pixel_values (P, C, p, p), grid_hws (N, 2) int64)."""
    if not images:
        raise ValueError("pack_images: images must be a non-empty list of (C, H, W) tensors")
    pieces, grids = [], []
    for img in images:
        patches, hw = image_to_patches(img, **kwargs)
        pieces.append(patches)
        grids.append(hw)
    return torch.cat(pieces, dim=0), torch.tensor(grids, dtype=torch.int64)
