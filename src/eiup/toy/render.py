"""Render toy-world scenes: anti-aliased shapes with patterns on a plain background."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND_RGB, COLOR_RGB, Obj, Scene

SUPERSAMPLE = 4


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # one (H, W) float mask in [0, 1] per object, in caption order
    marks: np.ndarray | None = None  # (H, W) float in [0, 1]: coverage by the objects' dots and stripes


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 0.92, y * 0.92) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.15) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x * 1.1, y * 1.1) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.05))
    elif shape == "heart":
        pts = []
        for k in range(60):
            t = 2 * math.pi * k / 60
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17.0, (y + 2.5) / 17.0))
    elif shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        pts = [(x * 0.95, y * 0.95) for x, y in pts]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _shape_mask(obj: Obj, cx: float, cy: float, r: float, angle: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=255)
    return mask


def _pattern_mask(obj: Obj, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """1 where the pattern's dark marks are, in supersampled pixels."""
    if obj.pattern == "plain":
        return np.zeros((size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(2 * r / 3.2, 6.0 * SUPERSAMPLE)
    if obj.pattern == "striped":
        u = (xx - cx) * math.cos(angle + math.pi / 4) + (yy - cy) * math.sin(angle + math.pi / 4)
        return ((u / period) % 1.0 < 0.5).astype(np.float32)
    # dotted: a square grid of round dots
    gx = ((xx - cx) / period) % 1.0 - 0.5
    gy = ((yy - cy) / period) % 1.0 - 0.5
    return (gx**2 + gy**2 < 0.27**2).astype(np.float32)


def place_objects(n: int, rng: random.Random, size: int) -> list[tuple[float, float, float]]:
    """Centre and radius (pixels) per object: one object big anywhere, two in different halves."""
    if n == 1:
        frac = rng.uniform(0.30, 0.70)
        r = frac * size / 2
        return [(rng.uniform(r, size - r), rng.uniform(r, size - r), r)]
    horizontal = rng.random() < 0.75
    out = []
    for k in range(n):
        frac = rng.uniform(0.28, 0.44)
        r = frac * size / 2
        lo, hi = (k * size / 2, (k + 1) * size / 2)
        a = rng.uniform(lo + r, hi - r) if hi - lo > 2 * r else (lo + hi) / 2
        b = rng.uniform(r + 1, size - r - 1)
        out.append((a, b, r) if horizontal else (b, a, r))
    return out


def render(scene: Scene, size: int = 64) -> Rendered:
    """Render `scene` deterministically from its layout seed."""
    rng = random.Random(scene.layout_seed)
    big = size * SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = BACKGROUND_RGB[scene.background]
    masks = []
    marked = np.zeros((big, big), dtype=np.float32)
    places = place_objects(len(scene.objects), rng, size)
    if len(scene.objects) == 2 and rng.random() < 0.5:
        places = places[::-1]
    for obj, (cx, cy, r) in zip(scene.objects, places):
        angle = 0.0 if obj.shape == "circle" else math.radians(rng.uniform(-15, 15))
        cx, cy, r = cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE
        shape = np.asarray(_shape_mask(obj, cx, cy, r, angle, big), dtype=np.float32) / 255.0
        marks = _pattern_mask(obj, cx, cy, r, angle, big)
        base = np.array(COLOR_RGB[obj.color], dtype=np.float32)
        colour = base[None, None, :] * (1 - 0.6 * marks[..., None])
        canvas = canvas * (1 - shape[..., None]) + colour * shape[..., None]
        marked = marked * (1 - shape) + marks * shape
        masks.append(shape)
    img = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8)).resize((size, size), Image.BOX)
    small_masks = [
        np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.BOX), dtype=np.float32) / 255
        for m in masks + [marked]
    ]
    return Rendered(np.asarray(img), small_masks[:-1], small_masks[-1])
