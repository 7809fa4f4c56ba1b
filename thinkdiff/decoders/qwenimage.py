"""Qwen-Image: aligner tokens [B, L, 3584] in Qwen2.5-VL's hidden space, optional mask [B, L]. True CFG
(`true_cfg_scale`, default 4.0) uses negatives and their mask."""

from __future__ import annotations

from .base import Decoder


class QwenImageDecoder(Decoder):
    family = "qwenimage"
    display_name = "QwenImage"
    pipeline_class_name = "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    uses_mask = True
    default_guidance_scale = 4.0

    @property
    def conditioning_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.attention_mask,
                      true_cfg_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs.update(negative_prompt_embeds=cond.negative_prompt_embeds,
                          negative_prompt_embeds_mask=cond.negative_attention_mask)
        return kwargs
