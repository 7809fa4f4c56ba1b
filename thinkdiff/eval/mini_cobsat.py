"""A synthetic mini-CoBSAT drawn with PIL, offline and deterministic.

Same themes, labels, option order, folder and file names as CoBSAT (`datasets/{detail_space}_{obj}/{detail}_{obj}.jpg`,
`datasets/{task_type}.csv`), and CoBSAT's seed-123 `load_datasets/prompts_list_default.json`; only the pixels are
simple drawings: objects and animals are 10 + 10 silhouettes, colours are fills, backgrounds are two-colour
gradients, styles are render filters, actions are poses with a marker, textures are fill patterns. Within a theme
every pair of the 100 drawings differs clearly, so `OracleJudge` (judges.py) decodes an image by its nearest
reference drawing and tests can score without a model.

    >>> write_mini_cobsat("data/mini-cobsat")     # 500 JPGs, 64 x 64
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..atomic import atomic_dir
from ..errors import InputError
from .cobsat import ITEM_DICT, TASK_TYPES, prompt_lists, word

MARKER = "MINI_COBSAT.txt"

# ---------------------------------------------------------------------------------------------- silhouettes


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


# Each shape: a list of (polygon, fill) layers in unit coordinates [-1, 1], drawn in order (fill 0 cuts holes).
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    # objects
    "leaf": [([(0, -1), (0.55, -0.4), (0.6, 0.3), (0, 1), (-0.6, 0.3), (-0.55, -0.4)], 1)],
    "hat": [([(-1, 0.5), (1, 0.5), (1, 0.75), (-1, 0.75)], 1),
            ([(-0.5, -0.6), (0.5, -0.6), (0.5, 0.5), (-0.5, 0.5)], 1)],
    "cup": [([(-0.6, -0.7), (0.6, -0.7), (0.45, 0.9), (-0.45, 0.9)], 1),
            ([(0.55, -0.35), (0.95, -0.35), (0.95, 0.35), (0.5, 0.35), (0.5, 0.15), (0.75, 0.15), (0.75, -0.15),
              (0.55, -0.15)], 1)],
    "chair": [([(-0.6, -1), (-0.35, -1), (-0.35, 0), (0.6, 0), (0.6, 1), (0.35, 1), (0.35, 0.25), (-0.35, 0.25),
                (-0.35, 1), (-0.6, 1)], 1)],
    "car": [([(-1, 0), (-0.55, 0), (-0.35, -0.45), (0.35, -0.45), (0.55, 0), (1, 0), (1, 0.45), (-1, 0.45)], 1),
            (_regular(16, 0.22), 1)],
    "box": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 1)],
    "book": [([(-0.9, -0.6), (0.9, -0.6), (0.9, 0.6), (-0.9, 0.6)], 1), ([(-0.05, -0.6), (0.05, -0.6), (0.05, 0.6),
                                                                           (-0.05, 0.6)], 0)],
    "ball": [(_regular(48, 0.85), 1), ([(-1, -0.12), (1, -0.12), (1, 0.12), (-1, 0.12)], 0)],
    "bag": [([(-0.8, -0.2), (0.8, -0.2), (0.7, 0.9), (-0.7, 0.9)], 1),
            (_regular(32, 0.45), 1), (_regular(32, 0.28), 0)],
    "apple": [(_regular(40, 0.8), 1), ([(-0.05, -1), (0.15, -1), (0.1, -0.6), (-0.1, -0.6)], 1)],
    # animals
    "zebra": [(_regular(5, 0.9), 1)],
    "tiger": [([(-0.9, -0.9), (0.9, -0.9), (0.9, -0.5), (0.2, -0.5), (0.2, 0.9), (-0.2, 0.9), (-0.2, -0.5),
                (-0.9, -0.5)], 1)],
    "sheep": [([(-0.8, -0.9), (-0.4, -0.9), (-0.4, 0.5), (0.8, 0.5), (0.8, 0.9), (-0.8, 0.9)], 1)],
    "pig": [([(-0.8, -0.9), (0.8, -0.9), (0, 0), (0.8, 0.9), (-0.8, 0.9), (0, 0)], 1)],
    "monkey": [([(-0.4, -0.6), (0.4, -0.6), (0.9, 0.6), (-0.9, 0.6)], 1)],
    "lion": [([(-0.5, -0.6), (0.9, -0.6), (0.5, 0.6), (-0.9, 0.6)], 1)],
    "dog": [([(-0.9, -0.5), (0, 0.4), (0.9, -0.5), (0.9, 0.1), (0, 1), (-0.9, 0.1)], 1)],
    "cow": [(_regular(8, 0.9, phase=math.pi / 8), 1), (_regular(8, 0.45, phase=math.pi / 8), 0)],
    "cat": [([(-0.8, -0.9), (-0.4, -0.9), (-0.4, 0.5), (0.4, 0.5), (0.4, -0.9), (0.8, -0.9), (0.8, 0.9),
              (-0.8, 0.9)], 1)],
    "bird": [([(-0.8, -0.9), (-0.4, -0.9), (-0.4, -0.2), (0.4, -0.2), (0.4, -0.9), (0.8, -0.9), (0.8, 0.9),
               (0.4, 0.9), (0.4, 0.2), (-0.4, 0.2), (-0.4, 0.9), (-0.8, 0.9)], 1)],
}


def shape_mask(name: str, size: int, scale: float = 0.62, angle: float = 0.0,
               offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A boolean [size, size] mask of silhouette `name`, rotated by `angle` degrees, shifted by `offset` (fractions)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    half = size / 2
    for poly, fill in SHAPES[name]:
        pts = [(half + offset[0] * size + scale * half * (x * c - y * s),
                half + offset[1] * size + scale * half * (x * s + y * c)) for x, y in poly]
        draw.polygon(pts, fill=255 * fill)
    return np.asarray(img) > 127


def _outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    img = Image.fromarray((mask * 255).astype("uint8"))
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(2 * width + 1))) > 127
    shrunk = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
    return grown & ~shrunk


def _fill(size: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.float32), (size, size, 3)).copy()


def _gradient(size: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    return (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32) * np.ones((1, size, 1), np.float32)


def _paste(canvas: np.ndarray, mask: np.ndarray, paint) -> np.ndarray:
    paint = paint if isinstance(paint, np.ndarray) else _fill(canvas.shape[0], paint)
    canvas[mask] = paint[mask]
    return canvas


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size]


# ------------------------------------------------------------------------------------------------- themes

COLORS = {"yellow": (250, 215, 0), "white": (250, 250, 250), "red": (220, 20, 20), "purple": (128, 0, 160),
          "pink": (255, 150, 200), "orange": (255, 140, 0), "green": (20, 160, 40), "brown": (120, 70, 20),
          "blue": (20, 60, 220), "black": (10, 10, 10)}

BACKGROUNDS = {"beach": ((135, 206, 235), (238, 214, 175)), "desert": ((250, 200, 120), (210, 150, 60)),
               "glacier": ((220, 240, 255), (150, 200, 240)), "volcano": ((60, 20, 20), (230, 80, 0)),
               "park": ((120, 200, 120), (40, 120, 40)), "gym": ((200, 200, 210), (150, 110, 70)),
               "waterfall": ((60, 120, 200), (230, 240, 255)), "space": ((5, 5, 30), (60, 20, 110)),
               "cave": ((90, 75, 60), (20, 15, 10)), "seafloor": ((0, 60, 120), (190, 170, 110))}


def _color_object(detail: str, obj: str, size: int) -> np.ndarray:
    return _paste(_fill(size, (128, 128, 128)), shape_mask(obj, size), COLORS[detail])


def _background_animal(detail: str, obj: str, size: int) -> np.ndarray:
    top, bottom = BACKGROUNDS[detail]
    mask = shape_mask(obj, size)
    canvas = _paste(_gradient(size, top, bottom), mask, (235, 235, 235))
    return _paste(canvas, _outline(mask), (0, 0, 0))


def _style_object(detail: str, obj: str, size: int) -> np.ndarray:
    mask = shape_mask(obj, size)
    yy, xx = _grid(size)
    if detail == "watercolor":
        canvas = _paste(_fill(size, (255, 255, 255)), mask, (70, 130, 220))
        return np.asarray(Image.fromarray(canvas.astype("uint8")).filter(ImageFilter.GaussianBlur(size / 20)),
                          np.float32)
    if detail == "sketch":
        return _paste(_fill(size, (255, 255, 255)), _outline(mask), (30, 30, 30))
    if detail == "pixel":
        canvas = _paste(_fill(size, (230, 230, 230)), mask, (220, 40, 40))
        small = Image.fromarray(canvas.astype("uint8")).resize((8, 8), Image.BILINEAR)
        return np.asarray(small.resize((size, size), Image.NEAREST), np.float32)
    if detail == "origami":
        paint = np.where((xx > yy)[..., None], np.array((250, 170, 90), np.float32),
                         np.array((200, 110, 40), np.float32))
        return _paste(_fill(size, (245, 240, 225)), mask, paint)
    if detail == "lego":
        period = max(size // 8, 4)
        studs = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
        paint = np.where(studs[..., None], np.array((200, 160, 0), np.float32), np.array((255, 210, 0), np.float32))
        return _paste(_fill(size, (255, 255, 255)), mask, paint)
    if detail == "icon":
        canvas = _fill(size, (255, 255, 255))
        m = size // 10
        canvas[m:size - m, m:size - m] = (40, 90, 200)
        return _paste(canvas, mask, (255, 255, 255))
    if detail == "graffiti":
        rng = np.random.RandomState(7)
        blobs = rng.randint(0, 6, size=(8, 8))
        palette = np.array([(255, 0, 128), (0, 220, 120), (255, 230, 0), (0, 150, 255), (255, 90, 0), (160, 0, 255)],
                           np.float32)
        paint = palette[blobs[yy * 8 // size, xx * 8 // size]]
        canvas = _fill(size, (150, 70, 60))
        canvas[(yy % (size // 4)) == 0] = (200, 200, 200)
        return _paste(canvas, mask, paint)
    if detail == "futuristic":
        edge = _outline(mask, max(size // 32, 1))
        canvas = _paste(_fill(size, (5, 5, 20)), edge, (0, 255, 255))
        return np.asarray(Image.fromarray(canvas.astype("uint8")).filter(ImageFilter.GaussianBlur(1)), np.float32)
    if detail == "3d":
        period = max(size // 8, 4)
        lines = mask & (((xx % period) == 0) | ((yy % period) == 0))
        return _paste(_paste(_fill(size, (0, 0, 0)), _outline(mask), (0, 200, 0)), lines, (0, 255, 0))
    if detail == "old":
        vignette = np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2)[..., None] / size
        canvas = _fill(size, (215, 185, 135)) - 120 * vignette.astype(np.float32)
        return _paste(canvas, mask, (110, 80, 45))
    raise KeyError(detail)


ACTIONS = {  # angle, offset, marker colour, marker corner (x, y in fractions)
    "swim": (0, (0.0, 0.12), (0, 120, 255), (0.5, 0.92)),
    "sleep": (90, (0.0, 0.0), (40, 40, 140), (0.88, 0.1)),
    "sing": (-25, (0.0, 0.0), (255, 0, 160), (0.1, 0.1)),
    "run": (20, (-0.12, 0.0), (255, 120, 0), (0.92, 0.5)),
    "read": (0, (0.0, -0.1), (140, 80, 30), (0.5, 0.9)),
    "fly": (0, (0.0, -0.18), (120, 200, 255), (0.1, 0.9)),
    "eat": (-90, (0.0, 0.0), (0, 170, 0), (0.9, 0.9)),
    "drink": (45, (0.1, 0.1), (0, 200, 200), (0.1, 0.5)),
    "cry": (180, (0.0, 0.0), (90, 140, 255), (0.3, 0.1)),
    "angry": (-45, (0.0, 0.0), (230, 0, 0), (0.7, 0.1)),
}


def _action_animal(detail: str, obj: str, size: int) -> np.ndarray:
    angle, offset, colour, (mx, my) = ACTIONS[detail]
    mask = shape_mask(obj, size, scale=0.5, angle=angle, offset=offset)
    canvas = _paste(_fill(size, (250, 250, 245)), mask, (60, 60, 60))
    r = max(size // 10, 2)
    cx, cy = int(mx * size), int(my * size)
    canvas[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = colour
    return canvas


def _texture_object(detail: str, obj: str, size: int) -> np.ndarray:
    mask = shape_mask(obj, size)
    yy, xx = _grid(size)
    p = max(size // 10, 3)

    def two(cond, a, b):
        return np.where(cond[..., None], np.array(a, np.float32), np.array(b, np.float32))

    paint = {
        "wood": lambda: two((yy // p) % 2 == 0, (160, 100, 40), (110, 60, 20)),
        "wicker": lambda: two(((yy // p) + (xx // p)) % 2 == 0, (220, 180, 110), (150, 110, 50)),
        "sequined": lambda: two(((xx % p - p / 2) ** 2 + (yy % p - p / 2) ** 2) < (p / 3) ** 2, (230, 230, 240),
                                (110, 0, 130)),
        "plastic": lambda: two((xx - size * 0.35) ** 2 + (yy - size * 0.35) ** 2 < (size * 0.08) ** 2,
                               (255, 255, 255), (0, 170, 255)),
        "paper": lambda: two(xx % p == 0, (215, 215, 200), (248, 246, 236)),
        "metal": lambda: (np.linspace(90, 220, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 3),
                                                                                              np.float32)),
        "leather": lambda: (np.array((60, 30, 15), np.float32)
                            + np.random.RandomState(5).uniform(0, 50, size=(4, 4, 1)).astype(np.float32)[
                                yy * 4 // size, xx * 4 // size]),
        "lace": lambda: two(((xx + yy) % p == 0) | ((xx - yy) % p == 0), (255, 255, 255), (240, 160, 190)),
        "denim": lambda: two(((xx + yy) // max(p // 2, 1)) % 2 == 0, (40, 70, 150), (80, 120, 200)),
        "ceramic": lambda: two((np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2) // p) % 2 == 0,
                               (245, 240, 220), (30, 80, 170)),
    }[detail]()
    canvas = _paste(_fill(size, (255, 255, 255)), mask, paint)
    return _paste(canvas, _outline(mask), (0, 0, 0))


THEMES = {"color": _color_object, "background": _background_animal, "style": _style_object,
          "action": _action_animal, "texture": _texture_object}


def draw(task_type: str, detail: str, obj: str, size: int = 64) -> Image.Image:
    """The mini-CoBSAT drawing of (detail, obj) in theme `task_type`."""
    detail_space, obj_space = task_type.split("_")
    if detail not in ITEM_DICT[detail_space] or obj not in ITEM_DICT[obj_space]:
        raise InputError(f"({detail!r}, {obj!r}) is not a {task_type} pair.")
    array = THEMES[detail_space](detail, obj, size)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype("uint8"), "RGB")


def write_mini_cobsat(out_dir: str | Path, size: int = 64, quality: int = 95) -> Path:
    """Write the whole mini-CoBSAT (500 JPGs, 5 caption CSVs, the seed-123 sample lists) to `out_dir`, atomically."""
    out_dir = Path(out_dir)
    if size < 32:
        raise InputError(f"size must be at least 32 pixels, got {size}.")
    with atomic_dir(out_dir) as tmp:
        for task_type in TASK_TYPES:
            detail_space, obj_space = task_type.split("_")
            rows = []
            for obj in ITEM_DICT[obj_space]:
                folder = tmp / "datasets" / f"{detail_space}_{obj}"
                folder.mkdir(parents=True, exist_ok=True)
                for detail in ITEM_DICT[detail_space]:
                    name = f"{detail}_{obj}.jpg"
                    draw(task_type, detail, obj, size).save(folder / name, quality=quality)
                    rows.append((name, f"a {word(detail)} {obj}"))
            with open(tmp / "datasets" / f"{task_type}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "caption"])
                writer.writerows(rows)
        (tmp / "load_datasets").mkdir()
        (tmp / "load_datasets" / "prompts_list_default.json").write_text(json.dumps(prompt_lists(), indent=4))
        (tmp / MARKER).write_text(f"mini-CoBSAT drawn by thinkdiff.eval.mini_cobsat, {size}x{size} px, JPEG quality "
                                  f"{quality}. Same names and layout as CoBSAT; the pixels are synthetic.\n")
    return out_dir
