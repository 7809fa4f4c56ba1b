"""Our GRPO step against TRL 1.16's GRPOTrainer on the same tiny text Llama, in one run: the same problems per step
(8), group size (K = 8), completion length (16 tokens, forced by min = max new tokens), sampling (temperature 1),
KL weight (0.001), loss aggregation (per-sequence mean, TRL's `loss_type="grpo"`), one update per batch, CPU, float32.

    .venv/bin/pip install trl==1.16.0        # not a project dependency: only this benchmark needs it
    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 30] [--rounds 2] [--out runs/grpo_vs_trl]

The two trainers run in turn, `--rounds` times each (TRL, ours, TRL, ours, ...), so a slower spell of a shared
machine falls on both. Prints the median seconds per step of each over all its rounds (the first step of every
round left out: warm-up; the median, because a shared CPU adds rare steps several times slower to either) and ours /
TRL's throughput as a ratio of those medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

PROBLEMS, K, LENGTH = 8, 8, 16


def reward(completions, answer, **kwargs):
    from thinkdiff.grpo.verifiers import get_verifier

    verify = get_verifier("numeric")
    return [verify(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]


def step_timer():
    """A transformers TrainerCallback recording the wall time of every optimizer step in `.times`."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.last)

    return StepTimes()


def run_trl(model_dir: Path, problems: list[dict], steps: int, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]}
                              for p in problems])
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=steps, learning_rate=1e-4,
                      per_device_train_batch_size=PROBLEMS * K, num_generations=K, max_completion_length=LENGTH,
                      generation_kwargs={"min_new_tokens": LENGTH}, temperature=1.0, beta=0.001, loss_type="grpo",
                      num_iterations=1, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                      dataloader_num_workers=0, disable_tqdm=True)
    timer = step_timer()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir)), reward_funcs=reward,
                          args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.times


def run_ours(model_dir: Path, problems_path: Path, steps: int, out: Path) -> list[float]:
    from thinkdiff.config import GRPOTrainConfig, load_config
    from thinkdiff.grpo.trainer import train_grpo

    cfg = load_config(GRPOTrainConfig, None, [
        f"policy.model={model_dir}", f"policy.max_new_tokens={LENGTH}", f"policy.min_new_tokens={LENGTH}",
        "policy.do_sample=true", "policy.temperature=1.0", f"problems={problems_path}", "reward.alpha=0",
        "loss.beta=0.001", "loss.aggregation=grpo", f"train.output_dir={out}", f"train.max_steps={steps}",
        f"train.problems_per_step={PROBLEMS}", f"train.group_size={K}", f"train.micro_batch_size={PROBLEMS * K}",
        "train.lr=1e-4", "train.checkpoint_every=0", "train.overwrite=true"])
    train_grpo(cfg)
    return [json.loads(line)["step_s"] for line in (out / "log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round and trainer")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, in turn")
    parser.add_argument("--out", default="runs/grpo_vs_trl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from thinkdiff.grpo.base_policy import build_text_llama
    from thinkdiff.grpo.rare_task import VOCABULARY, AdditionTask

    out = Path(args.out)
    model_dir = build_text_llama(out / "model", VOCABULARY)
    train_path, _ = AdditionTask().write_problems(out / "problems")
    problems = [json.loads(line) for line in train_path.read_text().splitlines()]
    trl, ours = [], []
    for r in range(args.rounds):  # step 1 of every round is warm-up
        trl += run_trl(model_dir, problems, args.steps, out / f"trl-{r}")[1:]
        ours += run_ours(model_dir, train_path, args.steps, out / f"ours-{r}")[1:]
    trl_s, ours_s = statistics.median(trl), statistics.median(ours)
    print(f"{PROBLEMS} problems x K={K}, {LENGTH}-token completions, {args.rounds} rounds of {args.steps} steps each, "
          "first step of each left out")
    print("| trainer | median s / step | steps / s | mean s / step |\n|---|---|---|---|")
    for name, times, median in (("TRL 1.16 GRPOTrainer", trl, trl_s), ("ours (thinkdiff.grpo)", ours, ours_s)):
        print(f"| {name} | {median:.3f} | {1 / median:.3f} | {statistics.mean(times):.3f} |")
    print(f"ours / TRL throughput: {trl_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
