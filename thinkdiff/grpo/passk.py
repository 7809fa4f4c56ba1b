"""pass@k with the unbiased estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
for n samples with c correct, pass@k = 1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i).
AUC@K (Rewarding the Rare, Eq. 7) = 1/(K-1) * sum_{k=1}^{K-1} (pass@k + pass@(k+1)) / 2; AUC@1 = pass@1."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_curve(correct: list[list[bool]], max_k: int | None = None) -> list[float]:
    """Mean pass@k over problems for k = 1..K (K = max_k or the smallest number of samples per problem)."""
    if not correct:
        raise ValueError("No problems to score.")
    max_k = max_k or min(len(c) for c in correct)
    return [float(np.mean([pass_at_k(len(c), sum(c), k) for c in correct])) for k in range(1, max_k + 1)]


def auc_at_k(curve: list[float], k: int) -> float:
    if k == 1:
        return curve[0]
    return sum((curve[i] + curve[i + 1]) / 2 for i in range(k - 1)) / (k - 1)
