"""Qwen-Image: aligner tokens [B, L, 3584] in Qwen2.5-VL's hidden space, optional mask [B, L]. True CFG
(`true_cfg_scale`, default 4.0) uses negatives and their mask."""

from __future__ import annotations

import torch

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

    def encode_latents(self, pixels, generators):
        vae = self.pipe.vae  # a video VAE: one frame, latents normalised per channel
        latents = vae.encode(pixels.unsqueeze(2)).latent_dist.sample(generator=generators)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
        return ((latents - mean) / std)[:, :, 0]  # [B, C, h, w]

    def predict_flow(self, cond, noisy, timesteps):
        from diffusers import QwenImagePipeline

        batch, channels, h, w = noisy.shape
        pred = self.pipe.transformer(
            hidden_states=QwenImagePipeline._pack_latents(noisy, batch, channels, h, w), timestep=timesteps / 1000,
            encoder_hidden_states=cond.prompt_embeds, encoder_hidden_states_mask=cond.attention_mask,
            img_shapes=[[(1, h // 2, w // 2)]] * batch, return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return QwenImagePipeline._unpack_latents(pred, h * scale, w * scale, scale)[:, :, 0]

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.attention_mask,
                      true_cfg_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs.update(negative_prompt_embeds=cond.negative_prompt_embeds,
                          negative_prompt_embeds_mask=cond.negative_attention_mask)
        return kwargs
