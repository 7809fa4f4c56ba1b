"""The miniature world: mini-CoBSAT's 500 drawings (5 themes x 10 details x 10 objects), a caption for each, jittered
copies for training, and CoBSAT-format training sequences that never repeat an evaluation sample.

    caption("color_object", "green", "car")          -> "a green car"
    answer("background_animal", "beach", "lion")      -> "Create an image of a lion on a beach."

Evaluation keeps CoBSAT's layout and seed-123 lists (eval/cobsat.py). Training sequences come from their own seed, and
no (task, words, hidden value) of the seed-123 lists, at any shot count, appears among them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..eval.cobsat import (
    ITEM_DICT,
    MAX_SHOT,
    NUM_PROMPTS,
    TASK_TYPES,
    TASKS,
    CobsatSample,
    format_prompt,
    prompt_lists,
    word,
)
from ..eval.mini_cobsat import draw

ACTION_PHRASES = {"swim": "swimming", "sleep": "sleeping", "sing": "singing", "run": "running", "read": "reading",
                  "fly": "flying", "eat": "eating", "drink": "drinking", "cry": "crying", "angry": "looking angry"}
PLACE_PHRASES = {"beach": "on a beach", "desert": "in a desert", "glacier": "on a glacier", "volcano": "near a volcano",
                 "park": "in a park", "gym": "in a gym", "waterfall": "by a waterfall", "space": "in space",
                 "cave": "in a cave", "seafloor": "on the seafloor"}


def caption(task_type: str, detail: str, obj: str) -> str:
    """The caption of a drawing: what a diffusion prompt for it would say."""
    if task_type == "color_object":
        return f"a {detail} {obj}"
    if task_type == "style_object":
        return f"a {obj} in {word(detail)} style"
    if task_type == "action_animal":
        return f"a {obj} {ACTION_PHRASES[detail]}"
    if task_type == "texture_object":
        return f"a {obj} made of {detail}"
    if task_type == "background_animal":
        return f"a {obj} {PLACE_PHRASES[detail]}"
    raise ValueError(f"Unknown theme {task_type!r}.")


def answer(task_type: str, detail: str, obj: str) -> str:
    """What the miniature VLM is trained to answer for the next image (ThinkDiff asks for 'Create an image ...')."""
    return f"Create an image of {caption(task_type, detail, obj)}."


def world_vocabulary_texts() -> list[str]:
    """Every caption and every answer of the world."""
    return [caption(*d) for d in drawings()] + [answer(*d) for d in drawings()]


def drawings() -> list[tuple[str, str, str]]:
    """Every (theme, detail, object) of the world, in a fixed order."""
    return [(t, d, o) for t in TASK_TYPES for o in ITEM_DICT[t.split("_")[1]] for d in ITEM_DICT[t.split("_")[0]]]


def drawing_labels(task_type: str, detail: str, obj: str) -> tuple[int, int]:
    """(detail class in 0..49, object class in 0..19) of a drawing: the five themes' details in TASK_TYPES order,
    then objects before animals."""
    detail_space, obj_space = task_type.split("_")
    themes = [t.split("_")[0] for t in TASK_TYPES]
    return (10 * themes.index(detail_space) + ITEM_DICT[detail_space].index(detail),
            10 * ("object", "animal").index(obj_space) + ITEM_DICT[obj_space].index(obj))


def jittered(task_type: str, detail: str, obj: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A drawing with mild random variation: shifted by up to 3 px, scaled by 0.92-1.08, colours moved by up to 8
    levels; the background fills what the shift uncovers."""
    image = draw(task_type, detail, obj, size)
    scale = rng.uniform(0.92, 1.08)
    dx, dy = rng.integers(-3, 4, size=2)
    inverse = (1 / scale, 0, (size / 2) * (1 - 1 / scale) - dx / scale,
               0, 1 / scale, (size / 2) * (1 - 1 / scale) - dy / scale)
    moved = image.transform((size, size), Image.AFFINE, inverse, resample=Image.BILINEAR,
                            fillcolor=image.getpixel((0, 0)))
    pixels = np.asarray(moved, dtype=np.int16) + rng.integers(-8, 9, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Sequence:
    """One CoBSAT-format training example: `shot` in-context drawings, then the query word; the answer names the
    drawing CoBSAT would expect next."""

    task_id: int
    x_items: tuple[str, ...]  # shot + 1 words' items (demos, then the query)
    theta: str  # the hidden value every drawing shares

    @property
    def shot(self) -> int:
        return len(self.x_items) - 1

    def pair(self, x: str) -> tuple[str, str]:
        """(detail, object) of the drawing for word item `x`."""
        task = TASKS[self.task_id]
        return (self.theta, x) if task.x_side == "obj" else (x, self.theta)

    def prompt(self) -> str:
        """ThinkDiff's instruction and `Word i: x, <image>` items, as eval-cobsat formats them."""
        words = [word(x) for x in self.x_items]
        fake = CobsatSample(task_id=self.task_id, shot=self.shot, index=0, theta=self.theta,
                            x_items=list(self.x_items), x_words=words, text_inputs=[f"{w}: " for w in words],
                            image_paths=["."] * self.shot, save_path="", gt_detail="", gt_obj="",
                            true_label_detail=0, true_label_obj=0)
        return format_prompt(fake)

    def answer(self) -> str:
        return answer(TASKS[self.task_id].task_type, *self.pair(self.x_items[-1]))

    def image_pairs(self) -> list[tuple[str, str]]:
        """(detail, object) of each in-context drawing."""
        return [self.pair(x) for x in self.x_items[:-1]]


@dataclass(frozen=True)
class Captioning:
    """One captioning example (ThinkDiff's first stage trains the aligner on these): a drawing and one of
    ThinkDiff's brief instructions; the answer is the drawing's description."""

    task_type: str
    detail: str
    obj: str
    instruction: str

    def prompt(self) -> str:
        return self.instruction

    def answer(self) -> str:
        return answer(self.task_type, self.detail, self.obj)

    def image_pairs(self) -> list[tuple[str, str]]:
        return [(self.detail, self.obj)]


def captioning_examples(count: int, seed: int = 0) -> list[Captioning]:
    """`count` captioning examples: uniform drawings, instructions from THINKDIFF_PROMPTS."""
    from ..config import THINKDIFF_PROMPTS

    rng = random.Random(f"thinkdiff-mini-captions/{seed}")
    world = drawings()
    return [Captioning(*rng.choice(world), rng.choice(THINKDIFF_PROMPTS)) for _ in range(count)]


def evaluation_keys() -> set[tuple[int, tuple[str, ...], str]]:
    """(task, words, hidden value) of every sample of CoBSAT's seed-123 lists, at every shot count."""
    keys = set()
    for entry in prompt_lists():
        for task in TASKS.values():
            for shot in range(1, MAX_SHOT + 1):
                theta = task.theta_list[entry["theta_list"][shot + 1]]
                keys.add((task.task_id, tuple(task.x_list[i] for i in entry["x_list"][:shot + 1]), theta))
    return keys


def training_sequences(count: int, seed: int = 0, shots: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[Sequence]:
    """`count` sequences over the 10 tasks and `shots`, drawn from `seed` (never CoBSAT's 123 stream): words and the
    hidden value uniformly, words without repeats as in CoBSAT; evaluation samples are skipped."""
    rng = random.Random(f"thinkdiff-mini/{seed}")
    banned = evaluation_keys()
    out: list[Sequence] = []
    while len(out) < count:
        task = TASKS[rng.randint(1, 10)]
        shot = rng.choice(shots)
        x_items = tuple(rng.sample(task.x_list, shot + 1))
        theta = rng.choice(task.theta_list)
        if (task.task_id, x_items, theta) not in banned:
            out.append(Sequence(task.task_id, x_items, theta))
    return out


__all__ = ["ACTION_PHRASES", "NUM_PROMPTS", "PLACE_PHRASES", "Captioning", "Sequence", "answer", "caption",
           "captioning_examples", "drawing_labels", "drawings",
           "evaluation_keys", "jittered", "training_sequences", "world_vocabulary_texts"]
