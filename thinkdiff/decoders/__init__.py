"""Decoder adapters, one per diffusers family. `load_decoder(family, path)` picks the class."""

from __future__ import annotations

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
        raise ValueError(f"Unknown decoder family {family!r}; choose one of {', '.join(DECODERS)}.")
    return DECODERS[family]


__all__ = ["DECODERS", "Decoder", "decoder_class"]
