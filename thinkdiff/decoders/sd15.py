"""Stable Diffusion 1.x UNet: aligner tokens [B, L, 768] in CLIP-L's text space (cross-attention). CFG (default
7.5) uses negatives of the same width."""

from __future__ import annotations

from .base import Decoder


class SD15Decoder(Decoder):
    family = "sd15"
    display_name = "SD1.5"
    pipeline_class_name = "StableDiffusionPipeline"
    text_components = ("text_encoder", "tokenizer", "safety_checker", "feature_extractor")
    default_guidance_scale = 7.5

    @property
    def conditioning_dim(self) -> int:
        return self.pipe.unet.config.cross_attention_dim

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, guidance_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs["negative_prompt_embeds"] = cond.negative_prompt_embeds
        return kwargs
