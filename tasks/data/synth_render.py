"""Procedural pictures for the synthetic corpus (``tasks/data/synth.py``), drawn with PIL only.

Everything is a pure function of a ``random.Random`` and sizes, so a seed fixes every pixel:

- shape scenes (1-4 objects with a known shape, colour, size, position and pixel box);
- rendered text (OCR), bar charts (chart QA), key/value documents (document QA);
- frame sequences of moving shapes (video QA, video haystacks).

Text uses PIL's built-in font (``ImageFont.load_default(size=...)``, a FreeType font bundled with Pillow >= 10),
so nothing is downloaded. Boxes are reported in pixels and normalised to integers in [0, 1000], the
grounding convention of Kimi-VL's data (REFERENCE.md, grounding data).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "star": 10, "diamond": 4, "hexagon": 6}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "orange": (245, 135, 30),
    "purple": (135, 60, 180),
    "black": (25, 25, 25),
    "pink": (240, 120, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (212, 212, 212),
    "beige": (240, 230, 205),
    "light blue": (212, 230, 245),
    "light green": (222, 242, 215),
}
SIZES = {"small": 0.08, "medium": 0.13, "large": 0.19}  # half-extent as a fraction of the shorter side
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(size)))


def text_size(text: str, size: int) -> tuple[int, int]:
    x1, y1, x2, y2 = font(size).getbbox(text)
    return x2 - min(0, x1), y2 - min(0, y1)


def norm_box(box: tuple[int, int, int, int], width: int, height: int) -> list[int]:
    """Pixel box (x1, y1, x2, y2) -> integers in [0, 1000] relative to the image size."""
    x1, y1, x2, y2 = box
    sx, sy = 1000.0 / width, 1000.0 / height
    return [
        min(1000, max(0, round(x1 * sx))),
        min(1000, max(0, round(y1 * sy))),
        min(1000, max(0, round(x2 * sx))),
        min(1000, max(0, round(y2 * sy))),
    ]


def position_name(cx: float, cy: float, width: int, height: int) -> str:
    col = ("left", "center", "right")[min(2, int(3 * cx / width))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / height))]
    if row == "middle":
        return "center" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


@dataclass(frozen=True)
class Obj:
    """One drawn shape; ``r`` is its half-extent in pixels, (cx, cy) its centre."""

    shape: str
    color: str
    size: str
    cx: int
    cy: int
    r: int

    def points(self) -> list[tuple[float, float]]:
        cx, cy, r = self.cx, self.cy, self.r
        if self.shape == "square":
            return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        if self.shape == "triangle":
            return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        if self.shape == "diamond":
            return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        if self.shape == "hexagon":
            return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
        if self.shape == "star":
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else 0.45 * r
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            return pts
        raise ValueError(f"no polygon for shape {self.shape!r}")

    def box(self) -> tuple[int, int, int, int]:
        """Tight pixel box (x1, y1, x2, y2) of the drawn shape."""
        if self.shape == "circle":
            return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)
        pts = self.points()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        fill = COLORS[self.color]
        if self.shape == "circle":
            draw.ellipse(self.box(), fill=fill)
        else:
            draw.polygon(self.points(), fill=fill)

    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def meta(self, width: int, height: int) -> dict[str, Any]:
        box = self.box()
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": position_name(self.cx, self.cy, width, height),
            "center": [self.cx, self.cy],
            "box_px": list(box),
            "box": norm_box(box, width, height),
        }


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[Obj] = field(default_factory=list)

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), BACKGROUNDS[self.background])
        d = ImageDraw.Draw(img)
        for o in self.objects:
            o.draw(d)
        return img

    def meta(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "objects": [o.meta(self.width, self.height) for o in self.objects],
        }


def sample_size(rng: random.Random, min_side: int, max_side: int) -> tuple[int, int]:
    return rng.randint(min_side, max_side), rng.randint(min_side, max_side)


def _radius(size: str, width: int, height: int) -> int:
    return max(4, int(SIZES[size] * min(width, height)))


def sample_scene(rng: random.Random, width: int, height: int, n_objects: int) -> Scene:
    """Up to ``n_objects`` non-overlapping shapes, all of distinct shapes AND distinct colours, so
    "the <colour> object", "the <shape>" and "the <colour> <shape>" each name exactly one object."""
    shapes = rng.sample(SHAPES, n_objects)
    colors = rng.sample(list(COLORS), n_objects)
    bg = rng.choice(list(BACKGROUNDS))
    scene = Scene(width, height, bg)
    for shape, color in zip(shapes, colors, strict=True):
        size = rng.choice(list(SIZES))
        r = _radius(size, width, height)
        for _ in range(40):
            cx = rng.randint(r + 1, max(r + 1, width - r - 2))
            cy = rng.randint(r + 1, max(r + 1, height - r - 2))
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 2 for o in scene.objects):
                scene.objects.append(Obj(shape, color, size, cx, cy, r))
                break
    return scene


def _contrast_pair(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, ink) with a large luminance gap."""
    if rng.random() < 0.75:
        bg = tuple(rng.randint(215, 255) for _ in range(3))
        ink = tuple(rng.randint(0, 90) for _ in range(3))
    else:
        bg = tuple(rng.randint(0, 60) for _ in range(3))
        ink = tuple(rng.randint(190, 255) for _ in range(3))
    return bg, ink  # type: ignore[return-value]


def render_text(
    rng: random.Random, lines: list[str], font_size: int, angle: float, min_side: int, max_side: int
) -> tuple[Image.Image, dict[str, Any]]:
    """Lines of text on a plain background, rotated by ``angle`` degrees; the font shrinks until it fits."""
    bg, ink = _contrast_pair(rng)
    size = font_size
    while True:
        lh = int(size * 1.3)
        tw = max(text_size(line, size)[0] for line in lines) + 4
        th = lh * len(lines) + 4
        layer = Image.new("L", (tw, th), 0)
        d = ImageDraw.Draw(layer)
        for k, line in enumerate(lines):
            d.text((2, 2 + k * lh), line, fill=255, font=font(size))
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        if (layer.width + 4 <= max_side and layer.height + 4 <= max_side) or size <= 6:
            break
        size -= 1
    w = min(max_side, max(min_side, layer.width + 4 + rng.randint(0, 24)))
    h = min(max_side, max(min_side, layer.height + 4 + rng.randint(0, 24)))
    img = Image.new("RGB", (w, h), bg)
    ox = rng.randint(0, max(0, w - layer.width))
    oy = rng.randint(0, max(0, h - layer.height))
    img.paste(Image.new("RGB", layer.size, ink), (ox, oy), layer)
    return img, {"font_size": size, "angle": round(angle, 2), "ink": list(ink), "background_rgb": list(bg)}


def render_bar_chart(
    rng: random.Random, title: str, labels: list[str], values: list[int], min_side: int, max_side: int
) -> Image.Image:
    """Vertical bar chart: title on top, each bar labelled with its value (above) and category (below)."""
    fs = 10 if max_side >= 160 else 8
    slot = max(max(text_size(lab, fs)[0] for lab in labels) + 6, 18)
    need = max(len(labels) * slot + 16, text_size(title, fs)[0] + 8)
    w = min(max_side, max(min_side, need, rng.randint(min_side, max_side)))
    h = min(max_side, max(min_side, rng.randint(max(min_side, 3 * w // 4), max_side)))
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    th = text_size(title, fs)[1]
    d.text((max(2, (w - text_size(title, fs)[0]) // 2), 2), title, fill=(0, 0, 0), font=font(fs))
    top, bottom, left, right = 2 * th + 8, h - th - 6, 6, w - 6
    d.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    slot_w = (right - left) / len(labels)
    vmax = max(values)
    palette = list(COLORS.values())
    offset = rng.randrange(len(palette))
    for k, (lab, v) in enumerate(zip(labels, values, strict=True)):
        x0 = left + k * slot_w
        bw = max(4, int(slot_w * 0.6))
        bx = int(x0 + (slot_w - bw) / 2)
        bh = max(1, int((bottom - top) * v / vmax))
        d.rectangle([bx, bottom - bh, bx + bw, bottom - 1], fill=palette[(offset + k) % len(palette)])
        vs = str(v)
        d.text(
            (bx + (bw - text_size(vs, fs)[0]) // 2, bottom - bh - th - 3), vs, fill=(0, 0, 0), font=font(fs)
        )
        lw = text_size(lab, fs)[0]
        d.text((int(x0 + (slot_w - lw) / 2), bottom + 2), lab, fill=(0, 0, 0), font=font(fs))
    return img


def render_document(
    rng: random.Random, title: str, fields: list[tuple[str, str]], min_side: int, max_side: int
) -> Image.Image:
    """A form-like page: a title, a rule under it, then ``key: value`` lines."""
    lines = [f"{k}: {v}" for k, v in fields]
    size = 11
    while size > 6:
        tw = max(text_size(title, size + 3)[0], *(text_size(line, size)[0] for line in lines)) + 12
        th = int((size + 3) * 1.6) + int(size * 1.5) * len(lines) + 12
        if tw <= max_side and th <= max_side:
            break
        size -= 1
    w = min(max_side, max(min_side, tw + rng.randint(0, 20)))
    h = min(max_side, max(min_side, th + rng.randint(0, 20)))
    paper = rng.choice([(255, 255, 255), (250, 247, 238), (244, 246, 250)])
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    d.text((6, 4), title, fill=(10, 10, 10), font=font(size + 3))
    y = 4 + int((size + 3) * 1.4)
    d.line([(6, y), (w - 6, y)], fill=(90, 90, 90))
    y += 4
    for line in lines:
        d.text((6, y), line, fill=(20, 20, 40), font=font(size))
        y += int(size * 1.5)
    return img


def motion_frames(
    rng: random.Random, n_frames: int, width: int, height: int
) -> tuple[list[Image.Image], dict[str, Any]]:
    """One shape moving in a straight line (a cardinal direction), optionally with a static distractor."""
    mover = sample_scene(rng, width, height, 1).objects[0]
    bg = rng.choice(list(BACKGROUNDS))
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    span = (width if dx else height) - 2 * mover.r - 4
    step = max(1, int(span * rng.uniform(0.5, 0.8)) // max(1, n_frames - 1))
    travel = step * (n_frames - 1)
    # start so that the whole path stays inside the frame
    if dx:
        x0 = mover.r + 2 if dx > 0 else width - mover.r - 3
        x0 += dx * rng.randint(0, max(0, span - travel))
        y0 = rng.randint(mover.r + 2, max(mover.r + 2, height - mover.r - 3))
    else:
        y0 = mover.r + 2 if dy > 0 else height - mover.r - 3
        y0 += dy * rng.randint(0, max(0, span - travel))
        x0 = rng.randint(mover.r + 2, max(mover.r + 2, width - mover.r - 3))
    path = [(x0 + dx * step * k, y0 + dy * step * k) for k in range(n_frames)]
    objs_static: list[Obj] = []
    if rng.random() < 0.5:
        other = [s for s in SHAPES if s != mover.shape]
        colors = [c for c in COLORS if c != mover.color]
        shape, color, size = rng.choice(other), rng.choice(colors), rng.choice(list(SIZES))
        r = _radius(size, width, height)
        for _ in range(30):
            cx, cy = (
                rng.randint(r + 1, max(r + 1, width - r - 2)),
                rng.randint(r + 1, max(r + 1, height - r - 2)),
            )
            if all(math.hypot(cx - px, cy - py) > r + mover.r + 2 for px, py in path):
                objs_static.append(Obj(shape, color, size, cx, cy, r))
                break
    frames, positions = [], []
    for px, py in path:
        o = replace(mover, cx=px, cy=py)
        frames.append(Scene(width, height, bg, [*objs_static, o]).render())
        positions.append([px, py])
    meta = {
        "shape": mover.shape,
        "color": mover.color,
        "direction": direction,
        "step_px": step,
        "positions": positions,
        "num_frames": n_frames,
        "num_shapes": 1 + len(objs_static),
        "static": [o.meta(width, height) for o in objs_static],
        "background": bg,
    }
    return frames, meta


def drifting_frames(
    rng: random.Random, n_frames: int, width: int, height: int
) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """A scene of 1-3 shapes drifting and bouncing off the borders; per-frame scene metadata."""
    scene = sample_scene(rng, width, height, rng.randint(1, 3))
    vel = [
        (rng.choice([-1, 1]) * rng.randint(1, 3), rng.choice([-1, 1]) * rng.randint(1, 3))
        for _ in scene.objects
    ]
    frames, metas = [], []
    objs = list(scene.objects)
    for k in range(n_frames):
        s = Scene(width, height, scene.background, objs)
        frames.append(s.render())
        metas.append({"index": k, **s.meta()})
        moved = []
        for j, o in enumerate(objs):
            vx, vy = vel[j]
            nx, ny = o.cx + vx, o.cy + vy
            if not o.r + 1 <= nx <= width - o.r - 2:
                vx, nx = -vx, o.cx - vx
            if not o.r + 1 <= ny <= height - o.r - 2:
                vy, ny = -vy, o.cy - vy
            vel[j] = (vx, vy)
            moved.append(replace(o, cx=nx, cy=ny))
        objs = moved
    return frames, metas
