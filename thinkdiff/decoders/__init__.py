"""Decoder adapters, one per diffusers family. `load_decoder(DecoderConfig)` loads one as a config says."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .base import Decoder
from .flux import FluxDecoder
from .qwenimage import QwenImageDecoder
from .sana import SanaDecoder
from .sd3 import SD3Decoder
from .sd15 import SD15Decoder

DECODERS: dict[str, type[Decoder]] = {
    cls.family: cls for cls in (FluxDecoder, SD3Decoder, SD15Decoder, SanaDecoder, QwenImageDecoder)
}


def decoder_class(family: str) -> type[Decoder]:
    if family not in DECODERS:
        raise ConfigError(f"Unknown decoder family {family!r}; choose one of {', '.join(DECODERS)}.")
    return DECODERS[family]


logger = logging.getLogger(__name__)


def pooled_mode(config) -> str:
    """The pooled vector a `DecoderConfig` asks for: its `pooled`, or the family's default (FLUX: the CLIP embedding
    of "", ThinkDiff's choice; SD3: zeros; families without a pooled vector: none)."""
    cls = decoder_class(config.family)
    mode = cls.default_pooled if config.pooled is None else config.pooled
    if mode not in cls.pooled_choices:
        raise ConfigError(f"decoder.pooled={mode!r} does not apply to {cls.display_name}; choose one of "
                         f"{', '.join(cls.pooled_choices)} (or leave it unset for {cls.default_pooled!r}).")
    return mode


def load_decoder(config, keep_components: tuple[str, ...] = ()) -> Decoder:
    """The decoder a `thinkdiff.config.DecoderConfig` names: weights, dtype, device, pooled vector, CPU offload and
    VAE tiling. `keep_components`: text encoders to load as well (the text-bridge baseline)."""
    from ..config import torch_dtype
    from ..weights import resolve_model

    cls = decoder_class(config.family)
    pooled = pooled_mode(config)
    if pooled == "empty_prompt":
        keep_components = tuple(dict.fromkeys((*keep_components, "text_encoder", "tokenizer")))
    path = resolve_model(config.model, "decoder.model", hint=cls.download_hint(keep_components))
    offload = config.offload
    if offload != "none" and torch.device(config.device).type == "cpu":
        logger.warning("decoder.offload=%s has no effect with decoder.device=cpu (nothing to offload to).", offload)
        offload = "none"
    decoder = cls.from_pretrained(path, dtype=torch_dtype(config.dtype),
                                  device=config.device if offload == "none" else "cpu",
                                  keep_components=keep_components)
    if pooled == "empty_prompt":
        decoder.set_empty_prompt_pooled()
    if offload == "model":  # each component moves to the GPU while it runs (diffusers)
        decoder.pipe.enable_model_cpu_offload(device=config.device)
    elif offload == "sequential":  # each layer moves to the GPU while it runs: least memory, slowest (diffusers)
        decoder.pipe.enable_sequential_cpu_offload(device=config.device)
    if config.vae_tiling:
        decoder.pipe.vae.enable_tiling()
    return decoder


__all__ = ["DECODERS", "Decoder", "decoder_class", "load_decoder",
           "pooled_mode"]
