"""Randomness keyed by (seed, index): library code never seeds torch's global generator.

Every random draw that must be reproducible (a request's sampled answer, a training sample's noise, a model's
initial weights) takes its own `torch.Generator` made here from the run's seed and the item's index, so the result
depends on neither the batch it ran in nor on what ran before it.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item `index` of a run seeded with `seed` (numpy's SeedSequence: well mixed, stable)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def generator(seed: int, index: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on `device` for item `index` of a run seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, index))
