"""A small synthetic image-caption folder drawn with PIL (coloured shapes on coloured backgrounds), for tests,
demos and benchmarks: `write_toy_dataset(DIR, n)`."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, background: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    a, b = size // 5, size - size // 5
    if shape == "circle":
        draw.ellipse((a, a, b, b), fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle((a, a, b, b), fill=COLOURS[colour])
    else:
        draw.polygon([(size // 2, a), (b, b), (a, b)], fill=COLOURS[colour])
    return image


def write_toy_dataset(out_dir: str | Path, n: int = 16, seed: int = 0, size: int = 64) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        colour, background = rng.sample(sorted(COLOURS), 2)
        shape = rng.choice(SHAPES)
        draw_shape(shape, colour, background, size).save(out_dir / f"{i:05d}.png")
        (out_dir / f"{i:05d}.txt").write_text(f"a {colour} {shape} on a {background} background")
    return out_dir
