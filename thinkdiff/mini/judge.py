"""A second, independent judge for the miniature: a small CNN trained on jittered drawings to name each drawing's
detail and object (one 10-way head per item space: colour, style, action, texture, background, object, animal).
It answers CoBSAT's two questions with the option its head ranks first among the question's options, so it can
stand beside the oracle judge (nearest reference drawing) in `eval-cobsat` (`judge.kind=cnn`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..eval.cobsat import ITEM_DICT, TASK_TYPES
from ..eval.judges import parse_question
from .world import drawings, jittered

SPACES = ["color", "style", "action", "texture", "background", "object", "animal"]
SIZE = 64


class DrawingClassifier(nn.Module):
    """[B, 3, 64, 64] in [-1, 1] -> {space: [B, 10] logits}."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({s: nn.Linear(c_in, 10) for s in SPACES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {s: head(h) for s, head in self.heads.items()}


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_judge(out_dir: str | Path, steps: int = 800, batch_size: int = 64, lr: float = 2e-3, copies: int = 8,
                seed: int = 0, progress: bool = True) -> tuple[Path, list[float]]:
    """Train on `copies` jittered versions of every drawing (its own seed, apart from the decoder's); save
    model.safetensors + config.json to `out_dir`."""
    from safetensors.torch import save_model

    rng = np.random.default_rng(10_000 + seed)
    world = drawings()
    images, labels = [], []
    for _ in range(copies):
        for theme, detail, obj in world:
            images.append(jittered(theme, detail, obj, rng))
            d_space, o_space = theme.split("_")
            labels.append((SPACES.index(d_space), ITEM_DICT[d_space].index(detail),
                           SPACES.index(o_space), ITEM_DICT[o_space].index(obj)))
    pixels, labels = to_pixels(images), torch.tensor(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torch initialises layers from the global RNG; restored on exit
        model = DrawingClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="mini judge", disable=not progress):
        idx = torch.randint(len(pixels), (batch_size,), generator=order)
        logits, y = model(pixels[idx]), labels[idx]
        loss = 0.0
        for space_col, item_col in ((0, 1), (2, 3)):
            for s, name in enumerate(SPACES):
                rows = y[:, space_col] == s
                if rows.any():
                    loss = loss + nn.functional.cross_entropy(logits[name][rows], y[rows, item_col],
                                                              reduction="sum") / batch_size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model.eval(), str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"kind": "mini-cnn-judge", "spaces": SPACES, "size": SIZE}))
    return out_dir, losses


class CNNJudge:
    """Answers CoBSAT's judge questions with the trained classifier: the question's options, ranked by the head of
    the asked space (the detail's space, or the object/animal space the options come from)."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_model

        with torch.random.fork_rng(devices=[]):  # its random init is overwritten; the caller's RNG stays as it was
            self.model = DrawingClassifier()
        load_model(self.model, str(Path(path) / "model.safetensors"))
        self.model.eval()
        self.name = f"cnn:{Path(path).name}"

    def space(self, question: str) -> tuple[str, list[str]] | None:
        parsed = parse_question(question)
        if parsed is None:
            return None
        mode, space, options = parsed
        if mode == "obj":
            space = next((s for s in ("object", "animal") if ITEM_DICT[s] == options), None)
        return (space, options) if space in SPACES else None

    @torch.no_grad()
    def ask_many(self, pairs) -> list[str]:
        logits = self.model(to_pixels([im for im, _ in pairs]))
        replies = []
        for row, (_, question) in enumerate(pairs):
            parsed = self.space(question)
            if parsed is None:
                replies.append("I cannot answer this question.")
                continue
            space, options = parsed
            scores = [float(logits[space][row, ITEM_DICT[space].index(o)]) for o in options]
            replies.append(str(int(np.argmax(scores)) + 1))
        return replies

    def ask(self, image: Image.Image, question: str) -> str:
        return self.ask_many([(image, question)])[0]


__all__ = ["CNNJudge", "DrawingClassifier", "SPACES", "TASK_TYPES", "train_judge"]
