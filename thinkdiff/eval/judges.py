"""Judges: one small interface, `ask(image, question) -> str`, so any VLM can score CoBSAT images.

| judge              | what answers                                                                                   |
| ------------------ | ---------------------------------------------------------------------------------------------- |
| `EngineJudge`      | any of our VLM engines (`make_engine`: transformers, vLLM, remote): one greedy generation with  |
|                    | the image and the question                                                                      |
| `TransformersJudge`| an image-text-to-text transformers model with its processor; `template="llava_v1"` builds the   |
|                    | exact conversation CoBSAT's LLaVA-1.5 judge sees (llava-hf/llava-1.5-13b-hf weights)            |
| `OracleJudge`      | no model: decodes the image by its nearest reference drawing in the dataset (mini-CoBSAT)       |

Judges may also offer `ask_many(pairs)` for batching; `ask_many(judge, pairs)` falls back to `ask` one by one.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..vlm import SamplingConfig, VLMRequest
from .cobsat import ITEM_DICT, TASK_TYPES, WORD2ITEM, theme_image_path, word


@runtime_checkable
class Judge(Protocol):
    name: str

    def ask(self, image: Image.Image, question: str) -> str: ...


def ask_many(judge: Judge, pairs: list[tuple[Image.Image, str]]) -> list[str]:
    """Answers for (image, question) pairs, batched when the judge can."""
    if not pairs:
        return []
    if hasattr(judge, "ask_many"):
        return judge.ask_many(pairs)
    return [judge.ask(image, question) for image, question in pairs]


# ---------------------------------------------------------------------------------------------- VLM engines


class EngineJudge:
    """A judge served by one of our `HiddenStateEngine`s: greedy, the image before the question."""

    def __init__(self, engine, max_new_tokens: int = 512, system: str | None = None, batch_size: int = 8,
                 name: str | None = None):
        self.engine, self.max_new_tokens, self.system, self.batch_size = engine, max_new_tokens, system, batch_size
        self.name = name or f"engine:{getattr(engine, 'model_path', type(engine).__name__)}"

    def ask(self, image: Image.Image, question: str) -> str:
        return self.ask_many([(image, question)])[0]

    def ask_many(self, pairs):
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, do_sample=False, seed=None)
        out = []
        for start in range(0, len(pairs), self.batch_size):
            requests = [VLMRequest(q, [im.convert("RGB")], system=self.system)
                        for im, q in pairs[start:start + self.batch_size]]
            out += [hs.text.strip() for hs in self.engine.generate(requests, [], sampling, progress=False)]
        return out


# --------------------------------------------------------------------------------- transformers (LLaVA-1.5)

# LLaVA's `conv_templates["llava_v1"]` (SeparatorStyle.TWO, sep " ", sep2 "</s>"), which CoBSAT's fork of
# LLaVA (yzeng58/LLaVA, llava/eval/run_llava.py) uses for llava-v1.5-13b; the image token goes before the question.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


def llava_v1_prompt(question: str, image_token: str = "<image>") -> str:
    return f"{LLAVA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `image_aspect_ratio: pad`: centre the image on a square of the processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class TransformersJudge:
    """An `AutoModelForImageTextToText` judge (LLaVA-1.5 via llava-hf weights, or any model with a chat template)."""

    TEMPLATES = ("llava_v1", "chat")

    def __init__(self, model_path: str | Path, template: str = "llava_v1", dtype: torch.dtype = torch.float32,
                 device: str = "cpu", max_new_tokens: int = 512, batch_size: int = 8, name: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if template not in self.TEMPLATES:
            raise ConfigError(f"Unknown judge template {template!r}; choose one of {', '.join(self.TEMPLATES)}.")
        self.template, self.max_new_tokens, self.batch_size = template, max_new_tokens, batch_size
        self.processor = AutoProcessor.from_pretrained(str(model_path))
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.name = name or f"transformers:{Path(str(model_path)).name}:{template}"
        mean = getattr(getattr(self.processor, "image_processor", None), "image_mean", None) or [0.5, 0.5, 0.5]
        self.pad_colour = tuple(int(round(255 * m)) for m in mean)

    def prompt(self, question: str) -> str:
        if self.template == "llava_v1":
            return llava_v1_prompt(question, getattr(self.processor, "image_token", "<image>"))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ask(self, image: Image.Image, question: str) -> str:
        return self.ask_many([(image, question)])[0]

    @torch.no_grad()
    def ask_many(self, pairs):
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            images = [im.convert("RGB") for im, _ in chunk]
            if self.template == "llava_v1":
                images = [expand_to_square(im, self.pad_colour) for im in images]
            enc = self.processor(text=[self.prompt(q) for _, q in chunk], images=images, padding=True,
                                 return_tensors="pt").to(self.device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            seqs = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=pad)
            texts = self.tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [t.strip().removesuffix("</s>").strip() for t in texts]
        return out


# ------------------------------------------------------------------------------------------------- oracle

_DETAIL_Q = re.compile(r"^What is the (\w+) \(of the main object\) in this image\?")
_OBJ_Q = re.compile(r"^What is the main object in this image\?")
_OPTIONS = re.compile(r"\((\d+)\)(.+?)(?= \(\d+\)|\. Answer the number only)")


def parse_question(question: str) -> tuple[str, str | None, list[str]] | None:
    """('detail', space, option items) or ('obj', None, option items) for a CoBSAT judge question, else None."""
    options = [WORD2ITEM.get(w, w) for _, w in _OPTIONS.findall(question)]
    if not options:
        return None
    m = _DETAIL_Q.match(question)
    if m:
        return "detail", m.group(1), options
    if _OBJ_Q.match(question):
        return "obj", None, options
    return None


class OracleJudge:
    """Answers CoBSAT's questions by nearest reference image (L2 at `size` x `size`) among the dataset's drawings
    of the matching theme(s). Exact on mini-CoBSAT; `flip_prob` makes it a noisy judge, `reply` a verbose one."""

    def __init__(self, root: str | Path, size: int = 32, flip_prob: float = 0.0, reply: str = "{n}", seed: int = 0):
        self.root, self.size, self.flip_prob, self.reply = Path(root), size, flip_prob, reply
        self.rng = random.Random(seed)
        self.name = "oracle" + (f"(flip={flip_prob})" if flip_prob else "")
        self._refs: dict[str, tuple[np.ndarray, list[tuple[str, str]]]] = {}

    def _array(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(image, np.float32).ravel() / 255.0

    def references(self, task_type: str):
        if task_type not in self._refs:
            detail_space, obj_space = task_type.split("_")
            keys = [(d, o) for o in ITEM_DICT[obj_space] for d in ITEM_DICT[detail_space]]
            arrays = []
            for d, o in keys:
                with Image.open(theme_image_path(self.root, task_type, d, o)) as im:
                    arrays.append(self._array(im))
            self._refs[task_type] = (np.stack(arrays), keys)
        return self._refs[task_type]

    def decode(self, image: Image.Image, task_types: list[str]) -> tuple[str, str, str]:
        """(task_type, detail, obj) of the nearest reference among `task_types`."""
        x = self._array(image)
        best = None
        for task_type in task_types:
            refs, keys = self.references(task_type)
            dist = ((refs - x) ** 2).sum(axis=1)
            i = int(dist.argmin())
            if best is None or dist[i] < best[0]:
                best = (float(dist[i]), task_type, *keys[i])
        return best[1:]

    def ask(self, image: Image.Image, question: str) -> str:
        parsed = parse_question(question)
        if parsed is None:
            return "I cannot answer this question."
        mode, space, options = parsed
        if mode == "detail":
            types = [t for t in TASK_TYPES if t.split("_")[0] == space]
        else:
            types = [t for t in TASK_TYPES if ITEM_DICT[t.split("_")[1]] == options]
        if not types:
            return "I cannot answer this question."
        _, detail, obj = self.decode(image, types)
        label = detail if mode == "detail" else obj
        n = options.index(label) + 1
        if self.flip_prob and self.rng.random() < self.flip_prob:
            n = self.rng.choice([k for k in range(1, len(options) + 1) if k != n])
        return self.reply.format(n=n, word=word(options[n - 1]))


# ------------------------------------------------------------------------------------------------ factory


def make_judge(config, root: str | Path | None = None) -> Judge:
    """A judge from a `JudgeConfig` (thinkdiff.eval.config); `root` is the dataset folder (oracle)."""
    from ..config import VLMConfig, torch_dtype
    from ..vlm import make_engine
    from ..weights import resolve_model

    if config.kind == "oracle":
        if root is None:
            raise ConfigError("The oracle judge needs the dataset folder (--root).")
        return OracleJudge(root, flip_prob=config.flip_prob, reply=config.reply, seed=config.seed)
    if config.kind == "engine":
        vlm = VLMConfig(model=config.model, backend=config.backend, dtype=config.dtype, device=config.device,
                        max_new_tokens=config.max_new_tokens, system=config.system)
        return EngineJudge(make_engine(vlm), max_new_tokens=config.max_new_tokens, system=config.system,
                           batch_size=config.batch_size, name=f"engine:{config.backend}:{config.model}")
    if config.kind == "cnn":
        from ..mini.judge import CNNJudge

        return CNNJudge(resolve_model(config.model, "judge.model"))
    if config.kind == "transformers":
        return TransformersJudge(resolve_model(config.model, "judge.model"), template=config.template,
                                 dtype=torch_dtype(config.dtype), device=config.device,
                                 max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                 name=f"transformers:{config.model}:{config.template}")
    raise ConfigError(f"Unknown judge kind {config.kind!r}; choose engine, transformers or oracle.")
