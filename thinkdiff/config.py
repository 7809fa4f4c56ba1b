"""Configuration as plain dataclasses, loaded from YAML and overridable from the command line (`key.sub=value`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


@dataclass
class VLMConfig:
    model: str = "tiny:mllama"  # a local folder, a Hugging Face repo id already in the local cache, or tiny:KIND
    backend: str = "transformers"
    dtype: str = "float32"
    device: str = "cpu"
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # ThinkDiff: min = max = 128, so the conditioning always has 128 tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    system: str | None = None
    max_images: int | None = None  # images per request; None = the model's own limit


@dataclass
class AlignerSection:
    path: str | None = None  # a folder written by Aligner.save_pretrained / train.py; None = random init
    layer: int = -1  # used only without `path` (a trained aligner knows its layer)
    embed: str = "output"  # "output" | "input" | "both", likewise
    seed: int = 0  # initialisation seed without `path`


@dataclass
class DecoderConfig:
    family: str = "flux"  # flux | sd3 | sd15 | sana | qwenimage
    model: str = "tiny:flux"
    dtype: str = "float32"
    device: str = "cpu"
    pooled: str = "zeros"  # FLUX pooled vector: "zeros" or "empty_prompt" (CLIP of "", ThinkDiff's choice)
    height: int = 512
    width: int = 512
    num_inference_steps: int = 28
    guidance_scale: float | None = None  # None = the family's default


@dataclass
class InferenceConfig:
    vlm: VLMConfig = field(default_factory=VLMConfig)
    aligner: AlignerSection = field(default_factory=AlignerSection)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    seed: int = 42


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys with the list of valid ones."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"Unknown config key {where}{sorted(unknown)[0]!r}; valid keys here: {sorted(names)}.")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML: numbers, true/false, null, lists) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form key.sub=value.")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r}: {part!r} is not a section.")
        node[leaf] = yaml.safe_load(value)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML at `path` (or start from defaults), apply overrides, build `cls`."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} not found.")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, apply_overrides(data, list(overrides)))
