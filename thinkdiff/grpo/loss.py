"""The clipped policy-ratio loss with a KL penalty to the reference policy (GRPO), per token.

    ratio_t = exp(logp_t - old_logp_t)
    pg_t    = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)      (clip-higher: eps_high > eps_low)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                             (k3 estimator, >= 0)
    loss_t  = pg_t + beta * kl_t

Aggregation over a batch of completions with masks m (1 = completion token):
    "grpo"     mean over each sequence's tokens, then mean over sequences
    "token"    sum over all tokens / number of tokens (DAPO's token-level loss)
    "dr_grpo"  sum over all tokens / (num sequences * max_completion_length) (Dr. GRPO)
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "token", "dr_grpo")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, beta: float = 0.0, eps_low: float = 0.2, eps_high: float | None = None,
                aggregation: str = "grpo", max_completion_length: int | None = None):
    """logp/old_logp/ref_logp/mask: [B, T]; advantages: [B]. Returns (loss, stats dict of floats)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if beta and ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if aggregation == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif aggregation == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        length = max_completion_length or mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * length)
    n = mask.sum().clamp(min=1)
    ratio = ratio.detach()
    stats = {"kl": float((kl.detach() * mask).sum() / n),
             "clip_fraction": float((((ratio - clipped).abs() > 0).to(mask.dtype) * mask).sum() / n)}
    return loss, stats
