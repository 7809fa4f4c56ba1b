"""Sana: aligner tokens [B, L, 2304] in Gemma-2's space with a required mask [B, L]. CFG (default 4.5) uses
negatives and their mask. Resolution binning is off, so the requested height and width are rendered as asked."""

from __future__ import annotations

from .base import Decoder


class SanaDecoder(Decoder):
    family = "sana"
    display_name = "Sana"
    pipeline_class_name = "SanaPipeline"
    text_components = ("text_encoder", "tokenizer")
    uses_mask = True
    mask_required = True
    default_guidance_scale = 4.5

    @property
    def conditioning_dim(self) -> int:
        return self.pipe.transformer.config.caption_channels

    def encode_latents(self, pixels, generators):
        vae = self.pipe.vae  # a deterministic DC-AE: no latent distribution
        return vae.encode(pixels).latent * vae.config.scaling_factor

    def predict_flow(self, cond, noisy, timesteps):
        return self.pipe.transformer(hidden_states=noisy, encoder_hidden_states=cond.prompt_embeds,
                                     encoder_attention_mask=cond.attention_mask, timestep=timesteps,
                                     return_dict=False)[0]

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.attention_mask,
                      guidance_scale=guidance_scale, use_resolution_binning=False)
        if guidance_scale > 1:
            kwargs.update(negative_prompt=None, negative_prompt_embeds=cond.negative_prompt_embeds,
                          negative_prompt_attention_mask=cond.negative_attention_mask)
        return kwargs
