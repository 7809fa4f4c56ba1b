"""Stable Diffusion 1.x UNet: aligner tokens [B, L, 768] in CLIP-L's text space (cross-attention). CFG (default
7.5) uses negatives of the same width."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Decoder


class SD15Decoder(Decoder):
    family = "sd15"
    display_name = "SD1.5"
    pipeline_class_name = "StableDiffusionPipeline"
    text_components = ("text_encoder", "tokenizer", "safety_checker", "feature_extractor")
    default_guidance_scale = 7.5
    backbone = "unet"

    @property
    def conditioning_dim(self) -> int:
        return self.pipe.unet.config.cross_attention_dim

    def training_loss(self, tokens, mask, pixels, generators):
        """Noise prediction (epsilon or v), as diffusers' examples/text_to_image/train_text_to_image.py."""
        from diffusers import DDPMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        cond = self.make_conditioning(tokens, mask)
        self.check_conditioning(cond, 1.0)
        scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        x0 = self.encode_latents(pixels.to(self.device, self.dtype), generators)
        noise = randn_tensor(x0.shape, generator=generators, dtype=x0.dtype).to(x0.device)
        timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                               for g in generators]).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        pred = self.pipe.unet(noisy, timesteps, cond.prompt_embeds, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, guidance_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs["negative_prompt_embeds"] = cond.negative_prompt_embeds
        return kwargs
