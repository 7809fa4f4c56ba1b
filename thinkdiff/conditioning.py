"""What an aligner hands a decoder: text-conditioning tensors in a diffusion model's own space."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Conditioning:
    """Text conditioning for a batch of B images.

    prompt_embeds           [B, L, D]  tokens in the decoder's text slot (FLUX/SD3: T5 4096, SD1.5: CLIP 768, ...)
    pooled_prompt_embeds    [B, P]     global vector where the decoder has one (FLUX: CLIP-L 768, SD3: 2048)
    attention_mask          [B, L]     1 = real token, where the decoder takes a mask (Sana, QwenImage)
    negative_*                         the same for the unconditional branch of classifier-free guidance
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    negative_attention_mask: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move every tensor; masks keep their integer dtype."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                is_mask = f.name.endswith("attention_mask")
                value = value.to(device=device, dtype=None if is_mask else dtype)
            moved[f.name] = value
        return Conditioning(**moved)

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        """Each of the B rows `repeats` times in a row: a batch of B * repeats, prompt-major."""
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else
                               getattr(self, f.name).repeat_interleave(repeats, dim=0) for f in fields(self)})
