"""pass@k of a policy checkpoint on verifiable problems, and how many distinct strategies its correct answers use.

    python -m thinkdiff eval-passk --config configs/grpo_tiny.yaml [--checkpoint DIR] [--n 16] [--out FILE.json]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..vlm import SamplingConfig, VLMRequest
from ..vlm.transformers_engine import TransformersEngine, load_model
from .passk import auc_at_k, pass_curve
from .verifiers import get_verifier


def load_policy_engine(path: str | Path, dtype=torch.float32, device: str = "cpu",
                       batch_size: int = 8) -> TransformersEngine:
    """A transformers engine on a policy folder: full weights, or LoRA adapters over their base model."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        merged = PeftModel.from_pretrained(load_model(base, dtype, device), str(path)).merge_and_unload().eval()
        return TransformersEngine(base, dtype=dtype, device=device, model=merged, batch_size=batch_size)
    return TransformersEngine(path, dtype=dtype, device=device, batch_size=batch_size)


def evaluate_passk(engine, problems, n: int, sampling: SamplingConfig, clusterer=None, keep_correct: bool = False,
                   progress: bool = True) -> dict:
    """n samples per problem -> pass@k (k = 1..n, unbiased estimator), AUC@n, mean distinct strategy clusters
    among each problem's correct answers (when a clusterer is given); `keep_correct`: also each sample's verdict
    (`correct`, [problems][n]). Sample j of problem i draws from the generator keyed by (seed, first_index + i * n + j):
    independent across problems as across samples (keys shared by every problem would make all problems take the same
    random choices, e.g. the same strategy in the same samples)."""
    correct, clusters = [], []
    for i, problem in enumerate(tqdm(problems, desc="pass@k", unit="problem", disable=not progress)):
        keyed = dataclasses.replace(sampling, first_index=sampling.first_index + i * n)
        outs = engine.generate([VLMRequest(problem.prompt, problem.images)] * n, [], keyed, progress=False)
        verify = get_verifier(problem.verifier)
        ok = [verify(o.text, problem.answer) > 0 for o in outs]
        correct.append(ok)
        right = [o.text for o, good in zip(outs, ok) if good]
        if clusterer is not None:
            clusters.append(len(set(clusterer.cluster(problem.prompt, right))) if len(right) > 1 else len(right))
    curve = pass_curve(correct, n)
    return {"n": n, "problems": len(problems), "pass_at_k": {str(k): v for k, v in enumerate(curve, 1)},
            "auc": auc_at_k(curve, n),
            "clusters_among_correct": sum(clusters) / len(clusters) if clusters else None,
            **({"correct": correct} if keep_correct else {})}


def format_report(result: dict) -> str:
    lines = [f"pass@k over {result['problems']} problems, n = {result['n']} samples each:"]
    lines += [f"  pass@{k:<3s} {v:.4f}" for k, v in result["pass_at_k"].items()]
    lines.append(f"  AUC@{result['n']}  {result['auc']:.4f}")
    if result["clusters_among_correct"] is not None:
        lines.append(f"  distinct strategies among correct answers (mean per problem): "
                     f"{result['clusters_among_correct']:.2f}")
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> None:
    from ..atomic import save_json

    save_json(result, path)
    Path(path).with_suffix(".txt").write_text(format_report(result) + "\n")


__all__ = ["evaluate_passk", "format_report", "load_policy_engine", "write_report"]
