"""FLUX.1 (dev/schnell): aligner tokens fill the T5 slot [B, L, 4096]; the CLIP-L pooled vector [B, 768] is the
CLIP embedding of the empty prompt (ThinkDiff's choice) or zeros. FLUX-dev's guidance is a distilled embedding, so
the default `guidance_scale=3.5` needs no negatives; true CFG (`true_cfg_scale`) is not used."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Decoder


class FluxDecoder(Decoder):
    family = "flux"
    display_name = "FLUX"
    pipeline_class_name = "FluxPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_guidance_scale = 3.5
    guidance_needs_negatives = False
    pooled_choices = ("empty_prompt", "zeros")
    default_pooled = "empty_prompt"

    @property
    def conditioning_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.pipe.transformer.config.pooled_projection_dim

    @torch.no_grad()
    def set_empty_prompt_pooled(self) -> None:
        """Use CLIP's pooled embedding of "" (needs the pipeline's `text_encoder`), then drop the encoder."""
        if self.pipe.text_encoder is None or self.pipe.tokenizer is None:
            raise ConfigError("decoder.pooled=empty_prompt (FLUX's default) needs FLUX's CLIP text encoder "
                             "(text_encoder/ and tokenizer/) in the checkpoint; use decoder.pooled=zeros for "
                             "checkpoints without it.")
        self.null_pooled = self.pipe._get_clip_prompt_embeds(prompt="", device=self.device)[0].float().cpu()
        self.pipe.text_encoder, self.pipe.tokenizer = None, None

    def predict_flow(self, cond, noisy, timesteps):
        from diffusers import FluxPipeline

        batch, channels, h, w = noisy.shape
        transformer = self.pipe.transformer
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.default_guidance_scale, device=noisy.device)
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, batch, channels, h, w), timestep=timesteps / 1000,
            guidance=guidance, pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, noisy.device, noisy.dtype),
            return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale)

    def pipeline_kwargs(self, cond, guidance_scale):
        return dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                    guidance_scale=guidance_scale)
