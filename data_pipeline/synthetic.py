"""synthetic://shapes?n=2048&classes=10&size=64&seed=0 : procedurally rendered labelled JPEGs.

Class = shape kind x colour family ("red_circle", ...). Each sample has its own position, scale,
rotation, hue/brightness jitter, fill texture and noisy background, all from
np.random.default_rng([seed, index]), so any subset renders identically on any worker. Colour
families make the classes linearly separable from pixels; shapes need spatial features.
"""
from __future__ import annotations

import colorsys
import io
import math
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
COLOURS = [("red", 0.0), ("green", 120.0), ("blue", 240.0), ("yellow", 60.0), ("magenta", 300.0), ("cyan", 180.0)]
DEFAULTS = {"n": 2048, "classes": 10, "size": 64, "seed": 0}


def parse_spec(source: str) -> dict:
    u = urlparse(source)
    if u.scheme != "synthetic" or u.netloc != "shapes":
        raise ValueError(f"synthetic source {source!r}: expected synthetic://shapes?n=..&classes=..&size=..&seed=..")
    spec = dict(DEFAULTS)
    for k, v in parse_qs(u.query).items():
        if k not in DEFAULTS:
            raise ValueError(f"synthetic source {source!r}: unknown parameter {k!r} (known: {sorted(DEFAULTS)})")
        spec[k] = int(v[-1])
    if not 1 <= spec["classes"] <= len(SHAPES) * len(COLOURS):
        raise ValueError(f"synthetic source: classes must be in 1..{len(SHAPES) * len(COLOURS)}, got {spec['classes']}")
    if spec["n"] < 1 or spec["size"] < 16:
        raise ValueError(f"synthetic source: need n >= 1 and size >= 16, got n={spec['n']} size={spec['size']}")
    return spec


def class_names(classes: int) -> list[str]:
    """Class c -> (shape c % S, colour c // S) with S = ceil(sqrt(classes)) shapes in use."""
    s = min(len(SHAPES), math.ceil(math.sqrt(classes)))
    return [f"{COLOURS[c // s][0]}_{SHAPES[c % s]}" for c in range(classes)]


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Outline of a shape of radius r centred at (cx, cy), rotated by rot."""
    if kind == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "diamond":
        pts = [(0, r), (0.6 * r, 0), (0, -r), (-0.6 * r, 0)]
    else:  # cross: 12-point outline of a plus sign
        w = r * 0.35
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render(index: int, spec: dict) -> tuple[bytes, str]:
    """JPEG bytes and class name of sample `index`."""
    size, classes = spec["size"], spec["classes"]
    rng = np.random.default_rng([spec["seed"], index])
    names = class_names(classes)
    c = index % classes
    colour_name, shape = names[c].split("_")
    hue = dict(COLOURS)[colour_name]
    # Background: low-saturation base, a gradient, and pixel noise.
    base = rng.uniform(60, 190, size=3)
    grad = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-25, 25, size=3)
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    bg = base + (base.mean() - base) * 0.6 + grad + rng.normal(0, 14, size=(size, size, 3))
    # Shape mask with random position, scale and rotation.
    r = rng.uniform(0.18, 0.34) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = r * 0.55
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
    # Fill: jittered hue in the colour family, textured by stripes and noise.
    h = ((hue + rng.uniform(-15, 15)) % 360) / 360
    rgb = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))) * 255
    yy, xx = np.mgrid[0:size, 0:size]
    freq, phase, ang = rng.uniform(0.2, 0.8), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
    stripes = 1 + 0.12 * np.sin(freq * (xx * math.cos(ang) + yy * math.sin(ang)) + phase)
    fill = rgb * stripes[..., None] + rng.normal(0, 8, size=(size, size, 3))
    img = np.clip(bg * (1 - mask) + fill * mask, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue(), names[c]


def plan_synthetic(source: str, chunk: int):
    from .sources import Plan, Unit
    spec = parse_spec(source)
    n = spec["n"]
    units = [Unit(i, "synthetic", {"source": source, "spec": spec, "start": s, "stop": min(n, s + chunk)},
                  min(n, s + chunk) - s) for i, s in enumerate(range(0, n, chunk))]
    return Plan("synthetic", units)


def synthetic_items(params: dict) -> Iterator:
    from .work import Item
    for i in range(params["start"], params["stop"]):
        data, name = render(i, params["spec"])
        key = f"{i:08d}"
        yield Item(params["source"], key, key, name, -1, len(data), data)
