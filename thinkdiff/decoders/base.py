"""A decoder adapter: one diffusers pipeline family driven by external `Conditioning` instead of its encoders.

Each family states what it consumes (width of the text slot, pooled vector, mask, CFG negatives), validates it with
errors that name the expected shapes, and calls its diffusers pipeline. Given the same conditioning and seed the
images are bit-identical to calling the pipeline directly with the same tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..conditioning import Conditioning
from ..errors import InputError

logger = logging.getLogger(__name__)


class Decoder:
    """Base adapter. Subclasses set the class attributes and `conditioning_dim` / `pooled_dim`."""

    family: str  # "flux", "sd3", ...
    display_name: str
    pipeline_class_name: str  # diffusers class
    text_components: tuple[str, ...]  # encoders and tokenizers we do not load
    uses_mask: bool = False  # takes an attention mask over the text tokens
    mask_required: bool = False
    default_guidance_scale: float = 1.0
    guidance_needs_negatives: bool = True  # guidance > 1 runs CFG, which needs negative conditioning
    pooled_choices: tuple[str, ...] = ("none",)  # decoder.pooled values this family accepts
    default_pooled: str = "none"
    backbone: str = "transformer"  # the denoiser's component (SD1.5: unet)

    @classmethod
    def download_hint(cls, keep_components: tuple[str, ...] = ()) -> str:
        """`hf download` arguments that fetch only the components we load (no text encoders we replace, no
        single-file checkpoints)."""
        folders = ("scheduler", cls.backbone, "vae", *keep_components)
        return "--include model_index.json " + " ".join(f'"{f}/*"' for f in folders)

    def __init__(self, pipe):
        self.pipe = pipe
        self.null_pooled: torch.Tensor | None = None  # [P], the pooled vector used with aligner tokens

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        keep_components: tuple[str, ...] = ()) -> "Decoder":
        """Load the pipeline from a local folder without its text encoders (except `keep_components`)."""
        import diffusers

        pipeline_class = getattr(diffusers, cls.pipeline_class_name)
        skip = {name: None for name in cls.text_components if name not in keep_components}
        pipe = pipeline_class.from_pretrained(str(path), dtype=dtype, **skip)
        pipe.to(device)
        return cls(pipe)

    # ----------------------------------------------------------------------------------- conditioning

    @property
    def conditioning_dim(self) -> int:
        """D, the width of the text slot the aligner must produce."""
        raise NotImplementedError

    @property
    def pooled_dim(self) -> int | None:
        """P, the width of the pooled vector, or None if the family has none."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (with CPU offload, the accelerator the parts visit, not where they rest)."""
        return self.pipe._execution_device

    def make_conditioning(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> Conditioning:
        """Conditioning from aligner tokens [B, L, D] (+ mask [B, L]): adds the pooled vector, zero negatives."""
        if tokens.dim() != 3:
            raise InputError(f"Expected aligner tokens of shape [B, L, D], got {tuple(tokens.shape)}.")
        batch, length, _ = tokens.shape
        pooled = None
        if self.pooled_dim is not None:
            null = self.null_pooled if self.null_pooled is not None else tokens.new_zeros(self.pooled_dim)
            pooled = null.to(tokens).expand(batch, -1).clone()
        if self.uses_mask and mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=tokens.device)
        return Conditioning(
            prompt_embeds=tokens, pooled_prompt_embeds=pooled, attention_mask=mask if self.uses_mask else None,
            negative_prompt_embeds=torch.zeros_like(tokens),
            negative_pooled_prompt_embeds=None if pooled is None else torch.zeros_like(pooled),
            negative_attention_mask=None if mask is None or not self.uses_mask else torch.ones_like(mask))

    def check_conditioning(self, cond: Conditioning, guidance_scale: float) -> None:
        """Raise a ValueError naming the expected shape when `cond` does not fit this decoder."""
        name, d = self.display_name, self.conditioning_dim
        pe = cond.prompt_embeds
        if pe.dim() != 3 or pe.shape[-1] != d:
            raise InputError(f"{name} expects prompt_embeds of shape [B, L, {d}], got {tuple(pe.shape)}: the aligner's "
                             f"output width must be {d} for this decoder.")
        batch, length = pe.shape[:2]
        self._check_pair(cond.pooled_prompt_embeds, "pooled_prompt_embeds", (batch, self.pooled_dim))
        if self.uses_mask:
            if cond.attention_mask is None and self.mask_required:
                raise InputError(f"{name} needs an attention_mask of shape [{batch}, {length}].")
            if cond.attention_mask is not None and tuple(cond.attention_mask.shape) != (batch, length):
                raise InputError(f"{name} expects attention_mask of shape [{batch}, {length}], "
                                 f"got {tuple(cond.attention_mask.shape)}.")
        if guidance_scale > 1 and self.guidance_needs_negatives:
            neg = cond.negative_prompt_embeds
            if neg is None:
                raise InputError(f"{name} with guidance_scale={guidance_scale} runs classifier-free guidance and "
                                 "needs negative_prompt_embeds; pass them or set guidance_scale=1.")
            if neg.dim() != 3 or neg.shape[0] != batch or neg.shape[-1] != d:
                raise InputError(f"{name} expects negative_prompt_embeds of shape [{batch}, L', {d}], "
                                 f"got {tuple(neg.shape)}.")
            self._check_pair(cond.negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds",
                             (batch, self.pooled_dim))

    def _check_pair(self, tensor, what, shape):
        batch, width = shape
        if width is None:
            return
        if tensor is None:
            raise InputError(f"{self.display_name} needs {what} of shape [{batch}, {width}].")
        if tuple(tensor.shape) != (batch, width):
            raise InputError(f"{self.display_name} expects {what} of shape [{batch}, {width}], "
                             f"got {tuple(tensor.shape)}.")

    # ------------------------------------------------------------------------------------- generation

    def pipeline_kwargs(self, cond: Conditioning, guidance_scale: float) -> dict:
        """The keyword arguments of the diffusers pipeline call that carry `cond`."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, cond: Conditioning, num_images_per_prompt: int = 1, height: int = 512, width: int = 512,
                 num_inference_steps: int = 28, guidance_scale: float | None = None, seed: int = 0,
                 progress: bool = True) -> list[Image.Image]:
        """Images from `cond`: B * num_images_per_prompt PIL images, prompt-major. The conditioning is repeated
        here, as diffusers does for a text prompt (its FLUX and SD3 pipelines do not repeat given pooled
        embeddings), so image i of prompt b gets the latents diffusers would give it."""
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_conditioning(cond, guidance_scale)
        cond = cond.to(self.device, self.dtype).repeat_interleave(num_images_per_prompt)
        self.pipe.set_progress_bar_config(disable=not progress, desc=f"{self.display_name} denoise")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = self.pipe(**self.pipeline_kwargs(cond, guidance_scale), num_images_per_prompt=1, height=height,
                        width=width, num_inference_steps=num_inference_steps, generator=generator, output_type="pil")
        return out.images

    # --------------------------------------------------------------------------------------- training

    def freeze(self) -> "Decoder":
        """Freeze every pipeline module; gradients still flow through them into the conditioning."""
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        return self

    def training_loss(self, tokens: torch.Tensor, mask: torch.Tensor | None, pixels: torch.Tensor,
                      generators: list[torch.Generator]) -> torch.Tensor:
        """The family's diffusion loss (a scalar, the mean over samples) for aligner tokens [B, L, D] (+ mask
        [B, L]) and the target images `pixels` [B, 3, H, W] in [-1, 1], following diffusers' training examples.
        `generators` (CPU, one per sample) draw each sample's latents, noise and timestep, so a sample's loss does
        not depend on the rest of its batch (nor on how a batch is split over processes)."""
        return self.latent_loss(tokens, mask, self.encode_latents(pixels.to(self.device, self.dtype), generators),
                                generators)

    def latent_loss(self, tokens: torch.Tensor, mask: torch.Tensor | None, x0: torch.Tensor,
                    generators: list[torch.Generator]) -> torch.Tensor:
        """`training_loss` for latents already encoded (`encode_latents`), e.g. a cache of a fixed image set."""
        cond = self.make_conditioning(tokens, mask)
        self.check_conditioning(cond, 1.0)
        return self.flow_matching_loss(cond, x0.to(self.device, self.dtype), generators)

    def encode_latents(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """VAE latents as the backbone sees them (shifted and scaled)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels).latent_dist.sample(generator=generators)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def flow_matching_loss(self, cond, x0: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Rectified flow: x_t = (1 - s) x0 + s noise, the backbone predicts noise - x0 (diffusers' SD3/FLUX
        examples, uniform timestep density, no loss weighting)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.training_utils import compute_density_for_timestep_sampling
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        batch = x0.shape[0]
        u = torch.cat([compute_density_for_timestep_sampling("none", 1, generator=g) for g in generators])
        index = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[index].to(x0.device)
        sigmas = scheduler.sigmas[index].to(x0.device, x0.dtype).view(batch, *[1] * (x0.dim() - 1))
        noise = randn_tensor(x0.shape, generator=generators, dtype=x0.dtype).to(x0.device)
        pred = self.predict_flow(cond, (1 - sigmas) * x0 + sigmas * noise, timesteps)
        return F.mse_loss(pred.float(), (noise - x0).float())

    def predict_flow(self, cond, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The backbone's prediction for noisy latents (same layout as `noisy`)."""
        raise NotImplementedError(f"{self.display_name} has no training path yet.")
