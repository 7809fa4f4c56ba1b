"""ThinkDiff's aligner: VLM hidden states [B, L, H] -> diffusion text-conditioning tokens [B, L, D].

    Linear(H -> D) -> GELU -> Linear(D -> D) -> RMSNorm(D)

as in ThinkDiff's `mlp2x_gelu_t5_norm` projector. ThinkDiff copies the RMSNorm weight from the text encoder whose
space it targets (Flan-T5's encoder `final_layer_norm`); without that init its training is unstable (paper Fig. 7).
`init_norm_from` does that. Saved as `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .atomic import save_json, save_safetensors
from .errors import ConfigError, InputError, MissingFileError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMBED_KINDS = ("output", "input", "both", "predicting")  # see HiddenStates.embed


@dataclass
class AlignerConfig:
    input_dim: int  # H, the VLM's hidden size
    output_dim: int  # D, the decoder's conditioning width (FLUX/SD3 T5 slot 4096, SD1.5 768, Sana 2304, ...)
    layer: int = -1  # which VLM layer it was trained on (transformers' numbering, -1 = final-normed state)
    embed: str = "output"  # which states it reads: generated tokens, prompt tokens, or both concatenated
    eps: float = 1e-6

    def __post_init__(self):
        if self.embed not in EMBED_KINDS:
            raise ConfigError(f"Aligner embed must be one of {EMBED_KINDS}, got {self.embed!r}.")
        if self.input_dim < 1 or self.output_dim < 1:
            raise ConfigError(f"Aligner widths must be positive, got {self.input_dim} -> {self.output_dim}.")


class Aligner(nn.Module):
    def __init__(self, config: AlignerConfig, generator: torch.Generator | None = None):
        """`generator` draws the initial weights (torch's nn.Linear init) and torch's global RNG is left alone;
        without it, the global RNG draws them, as in any torch module."""
        super().__init__()
        self.config = config
        with torch.device("meta") if generator is not None else contextlib.nullcontext():
            self.proj_in = nn.Linear(config.input_dim, config.output_dim)
            self.act = nn.GELU()
            self.proj_out = nn.Linear(config.output_dim, config.output_dim)
            self.norm = nn.RMSNorm(config.output_dim, eps=config.eps)
        if generator is not None:
            self.to_empty(device=generator.device)
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """nn.Linear's default initialisation (kaiming-uniform weights, uniform biases), drawn from `generator`."""
        for linear in (self.proj_in, self.proj_out):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(linear.in_features)
            nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
        self.norm.reset_parameters()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, L, H] (or [L, H]) -> [B, L, D] (or [L, D])."""
        if hidden_states.shape[-1] != self.config.input_dim:
            raise InputError(f"The aligner expects VLM states of width {self.config.input_dim}, got "
                             f"{hidden_states.shape[-1]} (shape {tuple(hidden_states.shape)}); was it trained for "
                             "another VLM?")
        x = hidden_states.to(self.proj_in.weight.dtype)
        return self.norm(self.proj_out(self.act(self.proj_in(x))))

    @torch.no_grad()
    def init_norm_from(self, weight: torch.Tensor | nn.Module) -> None:
        """Copy the RMSNorm weight from a text encoder's final norm (a module with `.weight`, or the tensor)."""
        weight = weight.weight if isinstance(weight, nn.Module) else weight
        if weight.shape != self.norm.weight.shape:
            raise InputError(f"Norm weight of shape {tuple(weight.shape)} does not fit the aligner's output width "
                             f"{self.config.output_dim}.")
        self.norm.weight.copy_(weight)

    def save_pretrained(self, save_directory: str | Path) -> None:
        save_directory = Path(save_directory)
        save_safetensors(self.state_dict(), save_directory / WEIGHTS_NAME, metadata={"format": "pt"})
        save_json(asdict(self.config), save_directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> "Aligner":
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise MissingFileError(f"No aligner at {directory}: {name} is missing (expected the output of "
                                        "Aligner.save_pretrained or train.py).")
        with torch.device("meta"):  # no initialisation: every weight comes from the file
            aligner = cls(AlignerConfig(**json.loads((directory / CONFIG_NAME).read_text())))
        aligner.load_state_dict(load_file(directory / WEIGHTS_NAME), assign=True)
        return aligner.to(dtype)
