"""Test helpers: build RECORD_SCHEMA rows and small datasets (with a manifest) in tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tasks.data.images import encode_image
from tasks.data.io import ShardWriter
from tasks.data.schema import IMAGE_TOKEN, RECORD_SCHEMA
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, write_manifest

DEFAULT_CAPTION = "A clear photograph of a red ball resting on a wooden table."
_UNSET: Any = object()


def make_record(
    id: str,
    kind: str = "caption",
    text: str | None = _UNSET,
    images: list[Image.Image | dict[str, Any]] | None = None,
    messages: list[dict[str, str]] | None = None,
    media_kind: str | None = None,
    meta: dict[str, Any] | str | None = None,
    source: str = "test",
    fmt: str = "png",
) -> dict[str, Any]:
    """One record. PIL images are encoded as ``fmt``; dicts are taken as already-encoded IMAGE_STRUCTs.

    ``text`` defaults (when no ``messages``) to one ``<image>`` line per image plus ``DEFAULT_CAPTION``;
    ``media_kind`` defaults to "image" when there are images, else "none"; ``meta`` may be a dict or a
    raw string (to test malformed meta).
    """
    imgs = [im if isinstance(im, dict) else encode_image(im, fmt) for im in images or []]
    if text is _UNSET:
        text = None if messages is not None else f"{IMAGE_TOKEN}\n" * len(imgs) + DEFAULT_CAPTION
    if media_kind is None:
        media_kind = "image" if imgs else "none"
    meta_s = meta if isinstance(meta, str) else json.dumps(meta or {}, sort_keys=True)
    return {
        "id": id,
        "kind": kind,
        "source": source,
        "text": text,
        "messages": messages,
        "images": imgs,
        "media_kind": media_kind,
        "meta": meta_s,
    }


def write_dataset(directory: Path, rows: list[dict[str, Any]], rows_per_shard: int = 3) -> Manifest:
    """Write ``rows`` as a finished dataset (shards + manifest of step 'test')."""
    with staged_dir(Path(directory)) as stage:
        w = ShardWriter(stage, RECORD_SCHEMA, rows_per_shard)
        w.write_many(rows)
        n = w.close()
        m = write_manifest(stage, kind="dataset", step="test", config={"rows": n}, counts={"rows": n})
    return m


def picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A textured RGB picture (gradient + random shapes), distinct for each seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    base = 128 + 100 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / rng.uniform(8, 20))
    arr = np.stack([base, base[::-1], base[:, ::-1]], axis=-1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, 30)), y0 + int(rng.integers(10, 30))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=color)
    return img
