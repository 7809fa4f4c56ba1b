"""Stable Diffusion 3 / 3.5: aligner tokens [B, L, 4096] in the joint text slot (where SD3 puts CLIP-L/G padded
to 4096 followed by T5), pooled [B, 2048] (CLIP-L ++ CLIP-G; zeros here). CFG (default 7.0) uses negatives."""

from __future__ import annotations

from .base import Decoder


class SD3Decoder(Decoder):
    family = "sd3"
    display_name = "SD3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                       "tokenizer_3")
    default_guidance_scale = 7.0
    pooled_choices = ("zeros",)
    default_pooled = "zeros"

    @property
    def conditioning_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.pipe.transformer.config.pooled_projection_dim

    def predict_flow(self, cond, noisy, timesteps):
        return self.pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.prompt_embeds,
                                     pooled_projections=cond.pooled_prompt_embeds, return_dict=False)[0]

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                      guidance_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs.update(negative_prompt_embeds=cond.negative_prompt_embeds,
                          negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds)
        return kwargs
