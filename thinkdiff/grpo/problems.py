"""Problems with verifiable answers, and a synthetic arithmetic task drawn with PIL.

JSONL, one problem per line: {"id": "p1", "prompt": "What is <image> plus <image>?", "images": ["a.png", "b.png"],
"answer": "7", "verifier": "numeric"} (image paths relative to the file; `images` and `verifier` optional).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import InputError, MissingFileError
from ..pipeline import load_image


@dataclass
class Problem:
    id: str
    prompt: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    verifier: str = "numeric"


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Problem file {path} not found (JSONL: id, prompt, answer, images, verifier).")
    problems = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problems.append(Problem(id=str(row["id"]), prompt=row["prompt"], answer=str(row["answer"]),
                                    images=[load_image(path.parent / p) for p in row.get("images", [])],
                                    verifier=row.get("verifier", "numeric")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{path}:{line_no}: not a problem ({err}).") from None
    if len(set(p.id for p in problems)) != len(problems):
        raise InputError(f"{path}: problem ids must be unique.")
    return problems[:limit]


def draw_digit(digit: int, size: int = 56) -> Image.Image:
    """A black digit on white, drawn with PIL's default font."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.text((size // 2, size // 2), str(digit), fill="black", anchor="mm", font_size=int(size * 0.7))
    return image


def write_arithmetic_task(out_dir: str | Path, n: int = 16, seed: int = 0, max_digit: int = 4) -> Path:
    """n problems "What is <image> plus <image>?" over digits 0..max_digit; returns the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for d in range(10):
        draw_digit(d).save(out_dir / "images" / f"{d}.png")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_digit), rng.randint(0, max_digit)
        rows.append({"id": f"add-{i}", "prompt": "What is <image> plus <image>? Answer with a number.",
                     "images": [f"images/{a}.png", f"images/{b}.png"], "answer": str(a + b),
                     "verifier": "numeric"})
    path = out_dir / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
