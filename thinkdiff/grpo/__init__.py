"""GRPO that rewards rare reasoning strategies ("Rewarding the Rare", Hu et al. 2026, arXiv 2601.08763)."""
