"""Hidden states on disk: one request's `HiddenStates` as a safetensors file.

Keys: `input_embed.L` [prompt_len, H] and `output_embed.L` [gen_len, H] per layer L (float32 unless asked),
`prompt_token_ids` and `output_token_ids` (int64); the answer text is in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import save_safetensors
from .errors import MissingFileError
from .vlm.engine import HiddenStates


def save_hidden_states(states: HiddenStates, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    tensors = {"prompt_token_ids": states.prompt_token_ids.long(), "output_token_ids": states.output_token_ids.long()}
    for layer, t in states.input_embed.items():
        tensors[f"input_embed.{layer}"] = t.to(dtype)
    for layer, t in states.output_embed.items():
        tensors[f"output_embed.{layer}"] = t.to(dtype)
    save_safetensors(tensors, path, metadata={"text": states.text})


def load_hidden_states(path: str | Path) -> HiddenStates:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Hidden-state file {path} not found.")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = (f.metadata() or {}).get("text", "")
    pick = lambda prefix: {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith(prefix)}
    return HiddenStates(prompt_token_ids=tensors["prompt_token_ids"], output_token_ids=tensors["output_token_ids"],
                        text=text, input_embed=pick("input_embed."), output_embed=pick("output_embed."))
