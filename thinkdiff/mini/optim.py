"""The optimisation every miniature stage shares: AdamW on a one-cycle learning-rate schedule (5% warmup, then
cosine down), gradients clipped at norm 1."""

from __future__ import annotations

import torch


class OneCycleAdamW:
    def __init__(self, parameters, lr: float, steps: int, weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=lr, total_steps=steps,
                                                             pct_start=0.05)
        self.max_grad_norm = max_grad_norm

    def step(self, loss: torch.Tensor) -> float:
        """Backpropagate `loss`, clip, update, advance the schedule; returns the loss."""
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()
