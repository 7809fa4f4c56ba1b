"""VLM engines behind one interface. `make_engine(VLMConfig)` picks the backend."""

from __future__ import annotations

from .engine import IMAGE_MARKER, HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest

BACKENDS = ("transformers",)


def make_engine(config) -> HiddenStateEngine:
    """An engine for `config` (a `thinkdiff.config.VLMConfig`)."""
    from ..config import torch_dtype
    from ..weights import resolve_model

    if config.backend not in BACKENDS:
        raise ValueError(f"Unknown VLM backend {config.backend!r}; choose one of {', '.join(BACKENDS)}.")
    path = resolve_model(config.model, "vlm.model")
    from .transformers_engine import TransformersEngine

    return TransformersEngine(path, dtype=torch_dtype(config.dtype), device=config.device,
                              max_images=config.max_images)


def sampling_from(config) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                          do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p)


__all__ = ["BACKENDS", "IMAGE_MARKER", "HiddenStateEngine", "HiddenStates", "SamplingConfig", "VLMRequest",
           "make_engine", "sampling_from"]
