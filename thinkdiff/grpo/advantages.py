"""Group advantages with strategy-uniqueness weights ("Rewarding the Rare", arXiv 2601.08763, §3).

For problem m with K rollouts, verifier rewards r_k and strategy clusters S_c (a judge partitions all K rollouts,
correct and wrong together):

    z_k = (r_k - mean(r)) / (std(r) + eps)          Eq. (1), GRPO's group normalisation (std with ddof = 1)
    f_k = |S_c(k)|                                    Eq. (3), size of rollout k's cluster, in [1, K]
    w_k = f_k ** (-alpha)                             Eq. (4), alpha in [0, 1]; alpha = 0 is plain GRPO
    A_k = w_k * z_k                                   Eq. (5), weight applied after normalisation

eps = 1e-4 and ddof = 1 follow TRL 1.16's GRPOTrainer (the paper states neither). `scale="none"` skips the division
by the std (Dr. GRPO). A group whose rewards are all equal has z = 0, so its judge call can be skipped.
"""

from __future__ import annotations

import torch

EPS = 1e-4


def cluster_sizes(labels: list[int]) -> list[int]:
    """f_k: the size of each rollout's cluster, from one label per rollout."""
    return [labels.count(label) for label in labels]


def uniqueness_weights(sizes, alpha: float) -> torch.Tensor:
    """w_k = f_k ** -alpha."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    return torch.as_tensor(sizes, dtype=torch.float64).pow(-alpha)


def group_advantages(rewards, scale: str = "group") -> torch.Tensor:
    """z for one group of K rewards: (r - mean) / (std + eps), or r - mean with scale='none'."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.numel() < 2:
        raise ValueError("A group needs at least 2 rollouts.")
    centred = r - r.mean()
    if scale == "none":
        return centred
    if scale != "group":
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}.")
    return centred / (r.std(unbiased=True) + EPS)


def rare_advantages(rewards, labels: list[int] | None, alpha: float, scale: str = "group") -> torch.Tensor:
    """A_k = w_k * z_k for one group; `labels` None (no clustering) gives plain GRPO."""
    z = group_advantages(rewards, scale)
    if labels is None or alpha == 0:
        return z
    if len(labels) != len(z):
        raise ValueError(f"Got {len(labels)} cluster labels for {len(z)} rollouts.")
    return uniqueness_weights(cluster_sizes(labels), alpha) * z
