"""Exploration collapse in miniature: does uniqueness-aware GRPO keep pass@k rising where plain GRPO stalls?

    python -m thinkdiff rare-experiment --config configs/rare_mini.yaml --out DIR [--quick] [key.sub=value ...]

1. The task (rare_task.AdditionTask): train.jsonl and heldout.jsonl, disjoint pairs.
2. The base policy: a text Llama trained from nothing on the task's traces (85% recall, 15% count).
3. From that one base, for every seed: plain GRPO (alpha 0, `grpo`) and uniqueness GRPO (`rare-0.5`, `rare-1`),
   the same steps, rollouts and seeds, the strategy judge being the task's program (`addition-method`).
4. Every policy (the base too, once per seed's sampling) answers each held-out problem `eval_samples` times:
   pass@1..pass@n (unbiased estimator), AUC@n, distinct strategies among the correct answers, and the same
   restricted to the hard pairs.

Writes DIR/summary.json (`curves`, `auc`, `strategies`, `per_seed`, ...) and DIR/passk.png. Finished parts of an
interrupted run are reused (each policy's folder, each evaluation's JSON).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ..atomic import save_json
from ..config import GRPOTrainConfig, RareExperimentConfig, from_dict, to_dict
from ..vlm import SamplingConfig
from .base_policy import build_text_llama, supervised_finetune
from .evaluate import evaluate_passk, load_policy_engine
from .passk import auc_at_k, pass_curve
from .problems import load_problems
from .rare_task import VOCABULARY, AdditionMethodJudge, AdditionTask

logger = logging.getLogger(__name__)


def method_name(alpha: float) -> str:
    return "grpo" if alpha == 0 else f"rare-{alpha:g}"


def train_base(cfg: RareExperimentConfig, task: AdditionTask, out: Path) -> Path:
    """The supervised base policy in `out` (reused when its weights exist); its losses in `out/losses.json`."""
    if (out / "model.safetensors").is_file():
        return out
    build_text_llama(out, VOCABULARY, seed=cfg.sft.seed, hidden_size=cfg.sft.hidden_size, layers=cfg.sft.layers)
    pairs = task.sft_examples(cfg.sft.steps * cfg.sft.batch_size, seed=cfg.sft.seed)
    losses = supervised_finetune(out, pairs, cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr)
    save_json({"losses": losses}, out / "losses.json")
    return out


def evaluate(policy_dir: Path, problems, hard: list[bool], cfg: RareExperimentConfig, seed: int, path: Path) -> dict:
    """pass@k over the held-out problems and over their hard part; cached in `path`."""
    if path.is_file():
        return json.loads(path.read_text())
    engine = load_policy_engine(policy_dir, batch_size=cfg.eval_samples)
    policy = cfg.grpo.policy
    sampling = SamplingConfig(max_new_tokens=policy.max_new_tokens, do_sample=True, temperature=policy.temperature,
                              top_p=policy.top_p, seed=10_000 + seed)
    result = evaluate_passk(engine, problems, cfg.eval_samples, sampling, AdditionMethodJudge(), keep_correct=True)
    correct = result.pop("correct")
    hard_rows = [c for c, h in zip(correct, hard) if h]
    result["hard"] = {"problems": len(hard_rows), "pass_at_k": pass_curve(hard_rows, cfg.eval_samples)} \
        if hard_rows else None
    save_json(result, path)
    return result


def run_rare_experiment(cfg: RareExperimentConfig, out: str | Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(to_dict(cfg), out / "config.json")
    task = AdditionTask(**dataclasses.asdict(cfg.task))
    train_path, heldout_path = task.write_problems(out / "problems")
    base = train_base(cfg, task, out / "base")
    heldout = load_problems(heldout_path)
    hard = [pair in task.hard_pairs() for pair in task.split()[1]]  # heldout.jsonl's order

    results: dict[str, dict[int, dict]] = {"base": {}}
    for seed in cfg.seeds:
        results["base"][seed] = evaluate(base, heldout, hard, cfg, seed, out / "base" / f"eval-seed-{seed}.json")
        for alpha in cfg.alphas:
            name, run = method_name(alpha), out / method_name(alpha) / f"seed-{seed}"
            if not (run / "policy").is_dir():
                from .trainer import train_grpo

                grpo = to_dict(cfg.grpo)
                grpo["policy"]["model"] = str(base)
                grpo["problems"] = str(train_path)
                grpo["reward"].update(alpha=alpha, judge="addition-method")
                grpo["train"].update(seed=seed, output_dir=str(run), overwrite=True)
                train_grpo(from_dict(GRPOTrainConfig, grpo, "rare-experiment grpo"))
            results.setdefault(name, {})[seed] = evaluate(run / "policy", heldout, hard, cfg, seed,
                                                          run / "eval.json")
    summary = summarize(results, cfg.eval_samples)
    summary["judge_agreement"] = judge_agreement(base, load_problems(train_path), cfg, out / "base" / "agreement.json")
    save_json(summary, out / "summary.json")
    plot(summary, out / "passk.png")
    return summary


def rand_index(a: list[int], b: list[int]) -> float:
    """The share of solution pairs that two partitions treat alike (both together or both apart); 1 for K < 2."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    return sum((a[i] == a[j]) == (b[i] == b[j]) for i, j in pairs) / len(pairs) if pairs else 1.0


def judge_agreement(base: Path, problems, cfg: RareExperimentConfig, path: Path) -> dict:
    """The program judge against the MiniLM clusterer on the same groups: the base policy's K rollouts of every
    training problem. Mean Rand index, and the share of groups both partition identically."""
    if path.is_file():
        return json.loads(path.read_text())
    from ..vlm import VLMRequest
    from .strategies import EmbeddingClusterer

    engine, k = load_policy_engine(base, batch_size=64), cfg.grpo.train.group_size
    program, minilm = AdditionMethodJudge(), EmbeddingClusterer(cfg.grpo.reward.embedding_threshold)
    sampling = SamplingConfig(max_new_tokens=cfg.grpo.policy.max_new_tokens, do_sample=True,
                              temperature=cfg.grpo.policy.temperature, seed=20_000)
    outs = engine.generate([VLMRequest(p.prompt) for p in problems for _ in range(k)], [], sampling, progress=False)
    scores, same = [], 0
    for g, problem in enumerate(problems):
        texts = [o.text for o in outs[g * k:(g + 1) * k]]
        a, b = program.cluster(problem.prompt, texts), minilm.cluster(problem.prompt, texts)
        scores.append(rand_index(a, b))
        same += scores[-1] == 1.0
    result = {"groups": len(problems), "group_size": k, "rand_index": float(np.mean(scores)),
              "identical_partitions": same / len(problems), "threshold": cfg.grpo.reward.embedding_threshold}
    save_json(result, path)
    return result


def summarize(results: dict[str, dict[int, dict]], n: int) -> dict:
    """Means over seeds per method: pass@1..n curves, AUC@n, strategies among correct answers; per-seed values."""
    summary = {"n": n, "curves": {}, "auc": {}, "strategies": {}, "hard_curves": {}, "seed_curves": {},
               "per_seed": {}}
    for method, by_seed in results.items():
        curves = np.array([[r["pass_at_k"][str(k)] for k in range(1, n + 1)] for r in by_seed.values()])
        summary["curves"][method] = curves.mean(0).tolist()
        summary["seed_curves"][method] = curves.tolist()
        summary["auc"][method] = float(np.mean([auc_at_k(c.tolist(), n) for c in curves]))
        summary["strategies"][method] = float(np.mean([r["clusters_among_correct"] for r in by_seed.values()]))
        hard = [r["hard"]["pass_at_k"] for r in by_seed.values() if r.get("hard")]
        summary["hard_curves"][method] = np.mean(hard, 0).tolist() if hard else None
        summary["per_seed"][method] = {
            str(seed): {"pass@1": r["pass_at_k"]["1"], f"pass@{n}": r["pass_at_k"][str(n)], "auc": r["auc"],
                        "strategies": r["clusters_among_correct"],
                        "hard_pass@1": r["hard"]["pass_at_k"][0] if r.get("hard") else None,
                        f"hard_pass@{n}": r["hard"]["pass_at_k"][-1] if r.get("hard") else None}
            for seed, r in by_seed.items()}
    return summary


def plot(summary: dict, path: Path) -> None:
    """pass@k curves (mean over seeds, shaded from the lowest to the highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = summary["n"]
    ks = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in summary["curves"].items():
        line, = ax.plot(ks, curve, label=f"{method} (AUC@{n} {summary['auc'][method]:.3f})")
        seeds = np.array(summary["seed_curves"][method])
        ax.fill_between(ks, seeds.min(0), seeds.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summary: dict) -> str:
    n = summary["n"]
    lines = [f"| method | pass@1 | pass@8 | pass@{n} | AUC@{n} | strategies among correct | hard pass@1 | "
             f"hard pass@{n} |", "|---|---|---|---|---|---|---|---|"]
    for method, curve in summary["curves"].items():
        hard = summary["hard_curves"][method]
        lines.append(f"| {method} | {curve[0]:.3f} | {curve[min(7, n - 1)]:.3f} | {curve[-1]:.3f} | "
                     f"{summary['auc'][method]:.3f} | {summary['strategies'][method]:.2f} | "
                     f"{hard[0] if hard else float('nan'):.3f} | {hard[-1] if hard else float('nan'):.3f} |")
    return "\n".join(lines)
