"""GRPO with uniqueness-weighted advantages, one loop read top to bottom.

    python train.py --config configs/grpo_rare.yaml [key.sub=value ...]

Each step: take `problems_per_step` problems, sample K = `group_size` answers each from the policy (temperature
sampling through our engine), score them with the problem's verifier, cluster each mixed group by solution strategy
(judge), turn rewards into A = w * z (advantages.py), and update the policy with the clipped ratio loss plus KL to the
reference policy (loss.py), `num_iterations` times per batch of rollouts, in padded micro-batches of
`micro_batch_size` completions (one forward and backward pass each).

Why not TRL's GRPOTrainer: TRL 1.16 forwards no Mllama inputs (`aspect_ratio_ids`, `aspect_ratio_mask`,
`cross_attention_mask`), so Llama-3.2-Vision, the seed's VLM, cannot be its policy; its VLM path needs a
transformers `ProcessorMixin`, which Qwen2-VL only gets with torchvision (absent on CPU installs here); it supports
vLLM up to 0.31 while we pin 0.32; and a reward function sees only a process's slice of a group, so group-level
uniqueness weights need an override of a private method. Our loop reuses the engine's own inputs for every VLM it
runs.

Several processes (`accelerate launch --num_processes N train.py ...`): each process takes whole groups (process r
the r-th contiguous `problems_per_step / N` problems of the step's batch), rolls them out on its own device with
transformers, scores them, and back-propagates its share of the global loss; gradients are then summed across
processes by accelerate's DDP, so every process takes the same optimizer step as one process holding the whole batch
would. vLLM rollouts run in one process.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from tqdm.auto import tqdm

from ..atomic import atomic_dir
from ..config import GRPOTrainConfig, RareRewardConfig, torch_dtype
from ..errors import ConfigError
from ..train.accelerator import make_accelerator
from ..train.align import batch_indices
from ..train.checkpoint import (
    check_resume_step,
    checkpoint_dir,
    keep_history,
    load_training_state,
    prepare_run,
    save_checkpoint,
)
from ..train.interrupt import GracefulStop, TrainingInterrupted
from ..vlm import SamplingConfig, VLMRequest
from ..vlm.transformers_engine import TransformersEngine
from ..weights import resolve_model
from .advantages import rare_advantages
from .loss import policy_loss
from .policy import Policy
from .problems import load_problems
from .strategies import JUDGES, EmbeddingClusterer, LLMJudgeClusterer, engine_ask, judge_names, openai_ask
from .verifiers import get_verifier

logger = logging.getLogger(__name__)


def build_clusterer(cfg: RareRewardConfig):
    """The strategy clusterer the config asks for (None when alpha = 0 or judge = none)."""
    if cfg.alpha == 0 or cfg.judge == "none":
        return None
    if cfg.judge == "embedding":
        return EmbeddingClusterer(cfg.embedding_threshold)
    if cfg.judge == "engine":
        if not cfg.judge_model:
            raise ConfigError("reward.judge=engine needs reward.judge_model (a model folder or tiny:KIND).")
        judge_engine = TransformersEngine(resolve_model(cfg.judge_model, "reward.judge_model"))
        return LLMJudgeClusterer(engine_ask(judge_engine, cfg.judge_max_new_tokens),
                                 fallback=EmbeddingClusterer(cfg.embedding_threshold))
    if cfg.judge == "openai":
        if not cfg.judge_url or not cfg.judge_model:
            raise ConfigError("reward.judge=openai needs reward.judge_url and reward.judge_model.")
        return LLMJudgeClusterer(openai_ask(cfg.judge_url, cfg.judge_model),
                                 fallback=EmbeddingClusterer(cfg.embedding_threshold))
    if cfg.judge in JUDGES:
        return JUDGES[cfg.judge]()
    raise ConfigError(f"Unknown reward.judge {cfg.judge!r}; choose one of {', '.join(judge_names())}.")


def score_group(problem, texts: list[str], clusterer, reward_cfg: RareRewardConfig):
    """Rewards [K], advantages [K] and cluster labels (None when the group was not clustered)."""
    verify = get_verifier(problem.verifier)
    rewards = [verify(text, problem.answer) for text in texts]
    labels = None
    if clusterer is not None and len(set(rewards)) > 1:  # equal rewards give z = 0: skip the judge
        labels = clusterer.cluster(problem.prompt, texts)
    return rewards, rare_advantages(rewards, labels, reward_cfg.alpha, reward_cfg.scale), labels


RESULTS = ("policy", "log.jsonl")  # what a run writes into its output folder


def save_policy(policy: Policy, directory: Path) -> None:
    with atomic_dir(directory) as tmp:
        policy.save_pretrained(tmp)


def train_grpo(cfg: GRPOTrainConfig) -> Path:
    """Train and return the folder of the final policy (`OUTPUT_DIR/policy`)."""
    # DDP: Mllama's cross-attention layers idle on text-only batches
    accelerator = make_accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = accelerator.process_index, accelerator.num_processes
    loop, loss_cfg = cfg.train, cfg.loss
    if world > 1 and cfg.rollout_backend == "vllm":
        raise ConfigError("rollout_backend=vllm runs in one process; launch several processes with "
                         "rollout_backend=transformers, or one process with vllm.")
    if loop.problems_per_step % world:
        raise ConfigError(f"train.problems_per_step={loop.problems_per_step} must be a multiple of the number of "
                         f"processes ({world}): every process takes whole groups.")
    out = Path(loop.output_dir)
    resume = prepare_run(accelerator, out, loop.resume, loop.overwrite, RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg.problems, cfg.limit)

    device = str(accelerator.device) if world > 1 else cfg.policy.device  # one device per process
    policy = Policy(resolve_model(cfg.policy.model, "policy.model"), dtype=torch_dtype(cfg.policy.dtype), device=device,
                    max_images=cfg.policy.max_images, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    keep_reference=loss_cfg.beta > 0, seed=loop.seed, batch_size=loop.rollout_batch_size)
    policy.distribute(accelerator)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    start = 0
    if resume:
        policy.load_trainable(resume / "policy.safetensors")
        start = load_training_state(resume, optimizer)
        check_resume_step(start, loop.max_steps, resume)
        logger.info("Resumed from %s at step %d", resume, start)
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        keep_history(log_path, start, step_of=lambda line: json.loads(line)["step"])
    rollout_engine = policy.engine
    if cfg.rollout_backend == "vllm":
        rollout_engine = _vllm_rollout_engine(cfg)
    clusterer = build_clusterer(cfg.reward)
    temperature = cfg.policy.temperature
    share = loop.problems_per_step // world  # problems per process and step

    bar = tqdm(range(start, loop.max_steps), initial=start, total=loop.max_steps, desc="grpo",
               disable=not accelerator.is_main_process)
    with GracefulStop() as stop:
        for step in bar:
            clock = time.perf_counter()
            batch = [problems[i] for i in batch_indices(step, len(problems), loop.problems_per_step, loop.seed)]
            batch = batch[rank * share:(rank + 1) * share]

            # 1. Rollouts: K samples per problem.
            policy.model.eval()
            requests = [VLMRequest(p.prompt, p.images) for p in batch for _ in range(loop.group_size)]
            sampling = SamplingConfig(max_new_tokens=cfg.policy.max_new_tokens,
                                      min_new_tokens=cfg.policy.min_new_tokens, do_sample=True,
                                      temperature=temperature, top_p=cfg.policy.top_p,
                                      seed=loop.seed * 100_003 + step, first_index=len(requests) * rank)
            with torch.no_grad():
                outputs = rollout_engine.generate(requests, [], sampling, progress=False)
            rollout_seconds = time.perf_counter() - clock

            # 2. Rewards, strategy clusters, uniqueness-weighted advantages.
            rewards, advantages, distinct = [], [], []
            for g, problem in enumerate(batch):
                group = outputs[g * loop.group_size:(g + 1) * loop.group_size]
                r, a, labels = score_group(problem, [o.text for o in group], clusterer, cfg.reward)
                rewards += r
                advantages.append(a)
                if labels is not None:
                    distinct.append(len({lab for lab, ok in zip(labels, r) if ok > 0}))
            advantages = torch.cat(advantages).float()

            # 3. Policy update on this process's groups, scaled as a share of the whole step's batch.
            completions = [o.output_token_ids for o in outputs]
            lengths = torch.tensor([sum(len(c) for c in completions), max(len(c) for c in completions)])
            totals = accelerator.gather(lengths.to(accelerator.device)).view(-1, 2).cpu()
            step_loss, kl = update_policy(policy, optimizer, requests, completions, advantages, temperature,
                                          loss_cfg, loop.max_grad_norm, total_tokens=int(totals[:, 0].sum()),
                                          total_completions=len(completions) * world,
                                          longest=int(totals[:, 1].max()), micro_batch_size=loop.micro_batch_size,
                                          accelerator=accelerator)
            if rollout_engine is not policy.engine:
                rollout_engine.update_weights(policy.merged_weights())

            stats = gather_object([(rewards, distinct, step_loss, kl)])  # one entry per process
            rewards = [r for s in stats for r in s[0]]
            distinct = [d for s in stats for d in s[1]]
            row = {"step": step + 1, "reward": sum(rewards) / len(rewards), "loss": sum(s[2] for s in stats),
                   "kl": sum(s[3] for s in stats),
                   "clusters_among_correct": sum(distinct) / len(distinct) if distinct else None,
                   "rollout_s": rollout_seconds, "step_s": time.perf_counter() - clock}
            if isinstance(clusterer, LLMJudgeClusterer):
                row.update(judge_calls=clusterer.calls, judge_failures=clusterer.failures)
            interrupted = stop.should_stop(accelerator)
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(reward=f"{row['reward']:.3f}", loss=f"{row['loss']:.4f}")
                if (loop.checkpoint_every and (step + 1) % loop.checkpoint_every == 0) or interrupted:
                    # Weights (full or LoRA) + optimizer + step: data order and rollout seeds are functions of
                    # (seed, step), so resuming from here continues exactly.
                    save_checkpoint(out, step + 1, lambda d: policy.save_trainable(d / "policy.safetensors"),
                                    optimizer, keep=loop.keep_checkpoints)
            accelerator.wait_for_everyone()
            if interrupted:
                bar.close()
                raise TrainingInterrupted(f"Interrupted: saved {checkpoint_dir(out, step + 1)}; continue with the "
                                          "same command and train.resume=latest.")
    if accelerator.is_main_process:
        save_policy(policy, out / "policy")
    accelerator.wait_for_everyone()
    return out / "policy"


def micro_batches(requests, size: int) -> list[list[int]]:
    """Consecutive runs of at most `size` requests of one kind (with images or without): one forward each."""
    batches = []
    for i, request in enumerate(requests):
        last = batches[-1] if batches else None
        if last and len(last) < size and bool(requests[last[0]].images) == bool(request.images):
            last.append(i)
        else:
            batches.append([i])
    return batches


def update_policy(policy: Policy, optimizer, requests, completions, advantages: torch.Tensor, temperature: float,
                  loss_cfg, max_grad_norm: float | None, total_tokens: int, total_completions: int, longest: int,
                  micro_batch_size: int = 16, accelerator=None) -> tuple[float, float]:
    """`loss_cfg.num_iterations` optimizer steps of the clipped loss on these completions (see `backward_share`).
    The log-probs before the update are only computed when the batch is used more than once (`num_iterations` >
    1); otherwise the ratio is exp(logp - logp.detach()) = 1, as in TRL. Returns this process's share of the loss
    and of the KL (of the last iteration)."""
    batches = micro_batches(requests, micro_batch_size)
    pick = lambda items, b: [items[i] for i in b]  # noqa: E731
    inputs = [policy.batch_inputs(pick(requests, b), pick(completions, b)) for b in batches]  # shared by every pass
    with torch.no_grad():
        old = [policy.logprobs(pick(requests, b), pick(completions, b), temperature, inputs=inputs[n])[0]
               for n, b in enumerate(batches)] if loss_cfg.num_iterations > 1 else None
        ref = [policy.logprobs(pick(requests, b), pick(completions, b), temperature, reference=True,
                               inputs=inputs[n])[0] if loss_cfg.beta else None for n, b in enumerate(batches)]
    policy.model.train()
    for _ in range(loss_cfg.num_iterations):
        optimizer.zero_grad()
        step_loss, kl = backward_share(policy, requests, completions, advantages, batches, inputs, old, ref,
                                       temperature, loss_cfg, total_tokens, total_completions, longest, accelerator)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), max_grad_norm)
        optimizer.step()
    return step_loss, kl


def backward_share(policy: Policy, requests, completions, advantages: torch.Tensor, batches: list[list[int]],
                   inputs: list, old, ref, temperature: float, loss_cfg, total_tokens: int, total_completions: int,
                   longest: int, accelerator=None) -> tuple[float, float]:
    """Back-propagate this process's share of the step's batch loss, one padded micro-batch [b, T] at a time
    (`inputs[n]`: micro-batch n's `Policy.batch_inputs`).

    Each micro-batch's loss is scaled to its share of the whole step (`total_*` and `longest` count every process),
    so the gradients accumulated here, summed over processes, are the gradient of the batch loss. accelerate's
    DDP averages over processes in the last backward (earlier ones run under `no_sync`), hence the factor N."""
    world = accelerator.num_processes if accelerator is not None else 1
    step_loss, kl = 0.0, 0.0
    for n, b in enumerate(batches):
        sync = accelerator is None or n == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(policy.trained):
            logp, mask = policy.logprobs([requests[i] for i in b], [completions[i] for i in b], temperature,
                                         inputs=inputs[n])
            loss, stats = policy_loss(logp, logp.detach() if old is None else old[n], ref[n], advantages[b], mask,
                                      beta=loss_cfg.beta, eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high,
                                      aggregation=loss_cfg.aggregation, max_completion_length=longest)
            tokens = float(mask.sum())
            share = tokens / total_tokens if loss_cfg.aggregation == "token" else len(b) / total_completions
            (loss * share * world).backward()
        step_loss += loss.item() * share
        kl += stats["kl"] * tokens / total_tokens
    return step_loss, kl


def _vllm_rollout_engine(cfg: GRPOTrainConfig):
    from ..vlm.vllm_engine import VLLMEngine

    return VLLMEngine(resolve_model(cfg.policy.model, "policy.model"), dtype=torch_dtype(cfg.policy.dtype))
