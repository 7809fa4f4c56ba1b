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

    def latent_loss(self, tokens, mask, x0, generators, snr_gamma: float | None = None):
        """The scheduler's prediction target (epsilon, v or the clean latent, "sample") as diffusers'
        examples/text_to_image/train_text_to_image.py, including its `--snr_gamma` option: Min-SNR-gamma loss
        weights (Hang et al. 2023), expressed for each target (epsilon min(snr, g) / snr, v min(snr, g) / (snr + 1),
        sample min(snr, g)), which train the high-noise steps that decide an image's content harder than plain MSE
        on epsilon does."""
        from diffusers import DDPMScheduler
        from diffusers.training_utils import compute_snr
        from diffusers.utils.torch_utils import randn_tensor

        cond = self.make_conditioning(tokens, mask)
        self.check_conditioning(cond, 1.0)
        scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        x0 = x0.to(self.device, self.dtype)
        noise = randn_tensor(x0.shape, generator=generators, dtype=x0.dtype).to(x0.device)
        timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                               for g in generators]).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = scheduler.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        elif prediction == "sample":
            target = x0
        else:
            raise ValueError(f"Unknown prediction_type {prediction!r}: use 'epsilon', 'v_prediction' or 'sample'.")
        pred = self.pipe.unet(noisy, timesteps, cond.prompt_embeds, return_dict=False)[0]
        if snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        snr = compute_snr(scheduler, timesteps)
        clamped = torch.clamp(snr, max=snr_gamma)
        weights = {"epsilon": clamped / snr, "v_prediction": clamped / (snr + 1), "sample": clamped}[prediction]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weights).mean()

    def pipeline_kwargs(self, cond, guidance_scale):
        kwargs = dict(prompt_embeds=cond.prompt_embeds, guidance_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs["negative_prompt_embeds"] = cond.negative_prompt_embeds
        return kwargs
