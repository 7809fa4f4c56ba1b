"""The miniature's decoder, an SD1.5-style latent diffusion model trained from nothing: a small `AutoencoderKL`
(64x64 drawings <-> 16x16x4 latents), then a small `UNet2DConditionModel` whose cross-attention reads the miniature
T5's encoder states, saved as a diffusers `StableDiffusionPipeline` that `decoders.load_decoder` opens as family
`sd15` (ThinkDiff's FLUX.1-dev, which reads T5 encoder states, in miniature).

Why this family: its UNet keeps attention at the low resolutions only (8x8 and 4x4 here), the cheapest to train on
2 CPU cores, and the pipeline takes the T5 states as `prompt_embeds` unchanged. The VAE learns on jittered drawings
(so it encodes any drawing); the UNet learns through our own `SD15Decoder.latent_loss` on the latents of the 500
exact drawings, one per caption as the world has, predicting the clean latent (`prediction_type="sample"`, plain
MSE). Measured from the T5 states of the world's answers (oracle judge, two sets of 50 drawings, 20 DDIM steps):
0.94 and 1.00 drawn right after 3,000 steps on the T5 with reconstruction, 0.46 and 0.44 on the T5 without it
(sixth session; its states kept animals 0.17 apart), 0.20 and 0.14 for the noise target on jittered drawings
(README, "ThinkDiff in miniature"). Conditioning is dropped for 10% of samples (zeros: the decoder's
classifier-free-guidance negatives). Aligned tokens land near the T5 encoder's outputs at best, so every sample's
states get Gaussian noise of a standard deviation drawn uniformly from [0, state_noise] (the states' own is ~0.85 per
channel).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..eval.mini_cobsat import draw
from ..rng import generator
from .optim import OneCycleAdamW
from .world import answer, caption, drawings, jittered

LATENT_SCALE = 0.5  # scaling_factor: latents of about unit variance for the UNet (set from the trained VAE)


def to_pixels(images) -> torch.Tensor:
    """RGB drawings (PIL, H x W) -> pixels in [-1, 1] [N, 3, H, W] float32."""
    arrays = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def drawing_pool(copies: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """`copies` jittered versions of each of the 500 drawings, in `drawings()` order per copy, as pixels in [-1, 1]
    [500 * copies, 3, size, size]: the VAE's training data."""
    rng = np.random.default_rng(seed)
    return to_pixels([jittered(*d, rng, size) for _ in range(copies) for d in drawings()])


def exact_drawings(size: int = 64) -> torch.Tensor:
    """The 500 drawings of `drawings()` as CoBSAT lays them out (no jitter), pixels in [-1, 1] [500, 3, size, size]."""
    return to_pixels([draw(*d, size) for d in drawings()])


def build_vae(channels: tuple[int, ...] = (16, 32, 32)):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                         scaling_factor=LATENT_SCALE)


def train_vae(pixels: torch.Tensor, steps: int = 1500, batch_size: int = 16, lr: float = 2e-3, kl_weight: float = 1e-6,
              seed: int = 0, progress: bool = True):
    """Reconstruction (MSE) + a small KL term, as Stable Diffusion's autoencoder (without its GAN and perceptual
    terms, which flat drawings do not need). Returns the VAE (its scaling factor set so latents have unit std) and
    the loss per step."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # diffusers initialises from the global RNG; restored on exit
        vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for step in tqdm(range(steps), desc="mini VAE", disable=not progress):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=order)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator(seed, step))).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = vae.encode(pixels[:256]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, losses


@torch.no_grad()
def t5_states(encoder, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """The miniature T5 encoder's states of each text and its </s> [len_i, D], unpadded (as aligned tokens come)."""
    return [encoder(input_ids=torch.tensor([tokenizer(text).input_ids])).last_hidden_state[0] for text in texts]


def build_pipeline(vae, t5_dir: str | Path, seed: int = 0):
    """A fresh UNet under the trained VAE, with the T5's encoder and tokenizer as the pipeline's own text path."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, T5EncoderModel

    text_encoder = T5EncoderModel.from_pretrained(str(t5_dir)).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(64, 128, 128),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    cross_attention_dim=text_encoder.config.d_model, attention_head_dim=32,
                                    norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="sample")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=AutoTokenizer.from_pretrained(
        str(t5_dir)), unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def encode_pool(decoder, pixels: torch.Tensor, seed: int = 0, chunk: int = 64) -> torch.Tensor:
    """Latents [N, 4, 16, 16] of every pool image, as the UNet sees them (one posterior sample each)."""
    return torch.cat([decoder.encode_latents(pixels[i:i + chunk], [generator(seed, j) for j in
                                                                   range(i, min(i + chunk, len(pixels)))])
                      for i in range(0, len(pixels), chunk)])


def train_decoder(out_dir: str | Path, t5_dir: str | Path, vae, steps: int = 3000, batch_size: int = 32,
                  lr: float = 1e-3, drop: float = 0.1, state_noise: float = 0.5, seed: int = 0,
                  progress: bool = True) -> tuple[Path, list[float]]:
    """Train the UNet on (exact drawing, T5 states of its caption or its answer) and save the pipeline to `out_dir`;
    returns the folder and the loss per step. The states come unpadded (as aligned tokens will) or padded to 16
    tokens by the pipeline's own `encode_prompt` (the text-bridge's path), half each; dropped rows get the zeros that
    ThinkDiff's negatives are, or the pipeline's own encoding of "", half each."""
    from ..decoders.sd15 import SD15Decoder

    world = drawings()
    texts = [t for d in world for t in (caption(*d), answer(*d))]  # caption i at 2i, answer i at 2i + 1
    pipe = build_pipeline(vae, t5_dir, seed)
    with torch.no_grad():
        padded = pipe.encode_prompt(texts + [""], "cpu", 1, do_classifier_free_guidance=False)[0]
    states = [t5_states(pipe.text_encoder, pipe.tokenizer, texts), list(padded[:-1])]
    negatives = [torch.zeros(0, padded.shape[-1]), padded[-1]]
    decoder = SD15Decoder(pipe)
    latents = encode_pool(decoder, exact_drawings(), seed)
    unet = pipe.unet.train()
    optim = OneCycleAdamW(unet.parameters(), lr, steps)
    order, rng = torch.Generator().manual_seed(seed), random.Random(f"thinkdiff-mini-decoder/{seed}")
    losses = []
    for step in tqdm(range(steps), desc="mini decoder", disable=not progress):
        picks = torch.randint(len(world), (batch_size,), generator=order).tolist()
        noise = generator(seed, step)
        tokens = torch.zeros(batch_size, padded.shape[1], padded.shape[-1])
        for row, i in enumerate(picks):
            form = rng.randint(0, 1)
            if rng.random() < drop:  # the unconditional branch of guidance
                tokens[row, :len(negatives[form])] = negatives[form]
            else:
                s = states[form][2 * i + rng.randint(0, 1)]
                tokens[row, :len(s)] = s + rng.uniform(0, state_noise) * torch.randn(s.shape, generator=noise)
        loss = decoder.latent_loss(tokens, None, latents[picks],
                                   [generator(seed, step * batch_size + row) for row in range(batch_size)])
        losses.append(optim.step(loss))
    out_dir = Path(out_dir)
    unet.eval()
    pipe.save_pretrained(out_dir)
    return out_dir, losses
