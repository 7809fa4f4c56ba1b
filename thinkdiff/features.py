"""Hidden states as safetensors: the one encoding that `extract` files, the server's /generate answers and
`RemoteEngine` share.

One request's states are the tensors `prompt_token_ids`, `output_token_ids` (int64), `input_embed.L`
[prompt_len, H] and `output_embed.L` [gen_len, H] per layer L; a file holds one request (metadata {"text": answer}),
a /generate answer holds n requests under the prefixes `0.`, `1.`, ... (metadata {"texts": JSON list}).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import save_safetensors
from .errors import MissingFileError
from .vlm.engine import HiddenStates


def states_to_tensors(states: HiddenStates, prefix: str = "", dtype: torch.dtype | None = None) -> dict:
    """{prefix + name: tensor} of one request (embeddings cast to `dtype` when given, else as the engine made
    them); every tensor owns its storage, as safetensors requires."""
    tensors = {f"{prefix}prompt_token_ids": states.prompt_token_ids.long().cpu().contiguous(),
               f"{prefix}output_token_ids": states.output_token_ids.long().cpu().contiguous()}
    for kind, embeds in (("input_embed", states.input_embed), ("output_embed", states.output_embed)):
        for layer, t in embeds.items():
            t = t.detach().cpu()
            tensors[f"{prefix}{kind}.{layer}"] = (t.to(dtype) if dtype is not None else t).clone()
    return tensors


def states_from_tensors(tensors: dict, text: str, prefix: str = "", layers: list[int] | None = None) -> HiddenStates:
    """The inverse of `states_to_tensors`; layer dicts follow the order of `layers` when given (as the engines
    return them), else ascending."""

    def pick(kind):
        start = f"{prefix}{kind}."
        found = {int(k[len(start):]): v for k, v in tensors.items() if k.startswith(start)}
        order = [k for k in (layers or []) if k in found] + sorted(set(found) - set(layers or []))
        return {k: found[k] for k in order}

    return HiddenStates(prompt_token_ids=tensors[f"{prefix}prompt_token_ids"],
                        output_token_ids=tensors[f"{prefix}output_token_ids"], text=text,
                        input_embed=pick("input_embed"), output_embed=pick("output_embed"))


def save_hidden_states(states: HiddenStates, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    save_safetensors(states_to_tensors(states, dtype=dtype), path, metadata={"text": states.text})


def load_hidden_states(path: str | Path) -> HiddenStates:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Hidden-state file {path} not found.")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = (f.metadata() or {}).get("text", "")
    return states_from_tensors(tensors, text)


def encode_states(states: list[HiddenStates]) -> bytes:
    """Many requests' states as one safetensors body (the server's /generate answer)."""
    from safetensors.torch import save

    tensors = {}
    for i, s in enumerate(states):
        tensors.update(states_to_tensors(s, prefix=f"{i}."))
    return save(tensors, metadata={"texts": json.dumps([s.text for s in states])})


def decode_states(body: bytes, n: int, layers: list[int] | None = None) -> list[HiddenStates]:
    """The `n` requests' states of an `encode_states` body; RuntimeError when it is not one."""
    from safetensors.torch import load

    try:
        tensors = load(body)
        texts = json.loads(body_metadata(body)["texts"])
    except Exception as err:
        raise RuntimeError(f"The VLM server sent an unreadable answer ({type(err).__name__}: {err}).") from None
    if len(texts) != n or any(f"{i}.prompt_token_ids" not in tensors for i in range(n)):
        raise RuntimeError(f"The VLM server answered {len(texts)} requests, expected {n}.")
    return [states_from_tensors(tensors, text, prefix=f"{i}.", layers=layers) for i, text in enumerate(texts)]


def body_metadata(body: bytes) -> dict:
    """The metadata of a safetensors body, without loading its tensors."""
    header_len = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + header_len]).get("__metadata__") or {}
