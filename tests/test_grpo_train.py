"""End-to-end GRPO on tiny VLMs with a drawn arithmetic task: the policy changes, rewards are logged."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from thinkdiff.__main__ import main
from thinkdiff.config import GRPOTrainConfig, apply_overrides, from_dict
from thinkdiff.grpo.problems import load_problems
from thinkdiff.grpo.trainer import train_grpo

ROOT = Path(__file__).resolve().parents[1]


def config(task, out, *overrides):
    data = yaml.safe_load((ROOT / "configs" / "grpo_tiny.yaml").read_text())
    return from_dict(GRPOTrainConfig, apply_overrides(data, [f"problems={task}", f"train.output_dir={out}",
                                                             "train.max_steps=3", *overrides]))


def rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_task_has_digit_images(task):
    problems = load_problems(task)
    assert len(problems) == 6 and all(len(p.images) == 2 for p in problems)
    assert all(p.answer in {"0", "1", "2"} for p in problems)


def test_grpo_steps_change_the_full_policy(task, tmp_path, tiny):
    final = train_grpo(config(task, tmp_path))
    log = rows(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(0 <= r["reward"] <= 1 for r in log) and any(r["reward"] > 0 for r in log)
    before = load_file(Path(tiny("qwen2-vl")) / "model.safetensors")
    after = load_file(final / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert log[-1]["kl"] > 0  # the policy moved away from the reference
    # The trained checkpoint evaluates with eval-passk.
    assert main(["eval-passk", "--config", str(ROOT / "configs" / "grpo_tiny.yaml"), f"problems={task}",
                 "--checkpoint", str(final), "--n", "4", "--out", str(tmp_path / "passk.json")]) == 0
    result = json.loads((tmp_path / "passk.json").read_text())
    assert set(result["pass_at_k"]) == {"1", "2", "3", "4"}
    curve = list(result["pass_at_k"].values())
    assert curve == sorted(curve)


def coin_task(task, out: Path) -> Path:
    """The task's problems with a verifier that rewards about half of any answers (the tiny random Mllama almost
    never writes a digit), so groups are mixed and the judge and the update have work."""
    from thinkdiff.grpo import verifiers

    if "coin" not in verifiers.VERIFIERS:
        verifiers.register("coin")(lambda text, answer: float(sum(map(ord, text)) % 2))
    rows = [dict(json.loads(line), verifier="coin") for line in Path(task).read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:  # images are paths relative to the problem file
        row["images"] = [str((Path(task).parent / im).resolve()) for im in row.get("images", [])]
    (out / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "problems.jsonl"


def test_grpo_lora_on_mllama_with_a_garbage_judge(task, tmp_path):
    """Mllama (cross-attention images) as a LoRA policy; the judge is a tiny random LLM whose replies never parse,
    so every mixed group falls back to the embedding clusters and the step still completes."""
    cfg = config(coin_task(task, tmp_path / "coin"), tmp_path, "policy.model=tiny:mllama", "policy.temperature=1.5",
                 "policy.max_new_tokens=16", "train.problems_per_step=3", "lora_rank=4", "reward.judge=engine",
                 "reward.judge_model=tiny:llama", "reward.judge_max_new_tokens=16", "train.lr=1e-2",
                 "loss.aggregation=token", "loss.eps_high=0.28", "loss.num_iterations=2")
    final = train_grpo(cfg)
    log = rows(tmp_path)
    assert len(log) == 3
    assert log[-1]["judge_calls"] == log[-1]["judge_failures"] > 0
    adapters = load_file(final / "adapter_model.safetensors")
    assert adapters and any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())


def test_plain_grpo_skips_the_judge(task, tmp_path):
    train_grpo(config(task, tmp_path, "reward.alpha=0", "train.max_steps=1"))
    assert rows(tmp_path)[0]["clusters_among_correct"] is None
    with pytest.raises(ValueError, match="judge_model"):
        train_grpo(config(task, tmp_path / "x", "reward.judge=engine"))


@pytest.mark.parametrize("lora", [0, 4])
def test_grpo_with_vllm_rollouts(tmp_path, lora):
    """Rollouts from the vLLM engine, policy weights (LoRA merged) pushed into it after every update."""
    import os
    import subprocess
    import sys

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i % 2} plus {1 - i % 2}?",
                                            "answer": "1"}) + "\n" for i in range(4)))
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "grpo_tiny.yaml"),
         f"problems={problems}", "policy.model=tiny:llama", "rollout_backend=vllm", f"lora_rank={lora}",
         f"train.output_dir={tmp_path / 'out'}", "train.max_steps=3", "policy.max_new_tokens=16",
         "policy.temperature=1.5", "train.lr=1e-3"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = rows(tmp_path / "out")
    assert len(log) == 3 and log[-1]["kl"] > 0


@pytest.mark.parametrize("aggregation", ["grpo", "token", "dr_grpo"])
def test_process_shares_of_the_update_sum_to_the_batch_gradient(task, aggregation):
    """Each process back-propagates its groups scaled by the whole batch's totals; the summed gradients must equal
    the gradient of policy_loss over the whole padded batch [B, T] at once."""
    from thinkdiff.config import GRPOLossConfig
    from thinkdiff.grpo.loss import policy_loss
    from thinkdiff.grpo.policy import Policy
    from thinkdiff.grpo.trainer import backward_share, micro_batches
    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import VLMRequest

    torch.manual_seed(0)
    policy = Policy(tiny_path("qwen2-vl"), keep_reference=True)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in policy.reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    problems = load_problems(task)[:2]
    requests = [VLMRequest(p.prompt, p.images) for p in problems for _ in range(3)]
    completions = [torch.randint(0, 400, (n,)) for n in (3, 5, 2, 4, 6, 1)]
    advantages = torch.randn(6)
    loss_cfg = GRPOLossConfig(beta=0.05, aggregation=aggregation)
    params = policy.trainable_parameters()

    # Reference: the batch loss in one call, each sequence's log-probs from its own unpadded pass.
    longest, total = max(map(len, completions)), sum(map(len, completions))
    pad = lambda rows: torch.stack([torch.cat([r, r.new_zeros(longest - len(r))]) for r in rows])
    single = lambda q, c, **kw: policy.logprobs([q], [c], **kw)[0][0]
    logp = pad([single(q, c) for q, c in zip(requests, completions)])
    with torch.no_grad():
        ref = pad([single(q, c, reference=True) for q, c in zip(requests, completions)])
    mask = pad([torch.ones(len(c)) for c in completions])
    loss, _ = policy_loss(logp, logp.detach(), ref, advantages, mask, beta=0.05, aggregation=aggregation,
                          max_completion_length=longest)
    expected = torch.autograd.grad(loss, params)

    # Two "processes" (groups 0 and 1), each scaled by the batch totals, in padded micro-batches of 2.
    shares = []
    for g in (slice(0, 3), slice(3, 6)):
        batches = micro_batches(requests[g], 2)
        with torch.no_grad():
            refs = [policy.logprobs([requests[g][i] for i in b], [completions[g][i] for i in b], reference=True)[0]
                    for b in batches]
        policy.model.zero_grad()
        inputs = [policy.batch_inputs([requests[g][i] for i in b], [completions[g][i] for i in b]) for b in batches]
        backward_share(policy, requests[g], completions[g], advantages[g], batches, inputs, None, refs, 1.0,
                       loss_cfg, total, 6, longest)
        shares.append([p.grad.clone() for p in params])
    for want, a, b in zip(expected, *shares):
        torch.testing.assert_close(a + b, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mllama", "qwen2-vl"])
def test_padded_log_probs_equal_each_sequence_alone(task, kind):
    """The update's batched pass (prompts left-padded, completions right-padded, images included) gives every
    completion token the log-prob of the sequence's own unpadded forward pass."""
    from thinkdiff.grpo.policy import Policy
    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import VLMRequest

    policy = Policy(tiny_path(kind), keep_reference=False)
    problems = load_problems(task)[:3]
    images = (lambda p: []) if kind == "llama" else (lambda p: p.images)
    prompts = ["Hi", "What is the sum of these two digits? Answer with one number only.", "Two plus two"]
    requests = [VLMRequest(text + " " + p.prompt if kind != "llama" else text, images(p))
                for text, p in zip(prompts, problems)]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(5, 300, (n,), generator=g) for n in (4, 1, 7)]
    with torch.no_grad():
        logp, mask = policy.logprobs(requests, completions, temperature=0.7)
        assert logp.shape == mask.shape == (3, 7) and mask.sum(1).tolist() == [4, 1, 7]
        for row, (q, c) in enumerate(zip(requests, completions)):
            inputs = policy.engine.forward_inputs(q, c)  # one unpadded sequence
            logits = policy.model(**inputs, use_cache=False).logits[0, -len(c) - 1:-1].float() / 0.7
            want = torch.log_softmax(logits, -1).gather(-1, c[:, None])[:, 0]
            torch.testing.assert_close(logp[row, :len(c)], want, atol=1e-5, rtol=1e-5)
            assert not mask[row, len(c):].any()


def test_grpo_on_two_processes_equals_one(task, tmp_path):
    """`accelerate launch --num_processes 2`: each process rolls out one group (its requests sample as their places
    in the whole step's call), gradients are summed: the rewards, losses and trained weights equal a one-process
    run's. problems_per_step that does not split into whole groups is refused."""
    import os
    import subprocess
    import sys

    def launch(out, *overrides):
        return subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"),
             "--config", str(ROOT / "configs" / "grpo_tiny.yaml"), f"problems={task}", f"train.output_dir={out}",
             "train.max_steps=2", "train.checkpoint_every=0", *overrides],
            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True, text=True,
            timeout=600)

    run = launch(tmp_path / "two", "train.problems_per_step=2", "train.group_size=4")
    assert run.returncode == 0, [line for line in run.stderr.splitlines() if "error" in line.lower()][:5]
    assert "2 process(es), MULTI_CPU" in run.stderr  # one gloo group, not two lone runs
    log = rows(tmp_path / "two")
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["reward"] in {i / 8 for i in range(9)} for r in log)  # means over 2 groups x 4 answers
    one = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "grpo_tiny.yaml"),
         f"problems={task}", f"train.output_dir={tmp_path / 'one'}", "train.max_steps=2", "train.checkpoint_every=0",
         "train.problems_per_step=2", "train.group_size=4"],
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    for a, b in zip(rows(tmp_path / "one"), log, strict=True):
        assert a["reward"] == b["reward"] and a["clusters_among_correct"] == b["clusters_among_correct"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7) and a["kl"] == pytest.approx(b["kl"], abs=1e-7)
    weights = [load_file(tmp_path / run / "policy" / "model.safetensors") for run in ("one", "two")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    odd = launch(tmp_path / "odd", "train.problems_per_step=3")
    assert odd.returncode != 0 and "multiple of the number of processes (2)" in odd.stderr


def test_uniqueness_weights_reach_the_update(task, tmp_path, monkeypatch):
    """The advantages the policy update receives are w * z computed by hand from the verifier's rewards and the
    clusterer's labels (w = cluster size ** -alpha), not the plain GRPO z."""
    from thinkdiff.grpo import trainer
    from thinkdiff.grpo.verifiers import get_verifier

    class ByLength:  # a deterministic strategy clusterer: answers of equal length share a strategy
        calls = 0

        def cluster(self, problem, solutions):
            ByLength.calls += 1
            return [len(s) % 3 for s in solutions]

    seen, update = [], trainer.update_policy

    def recording_update(policy, optimizer, requests, completions, advantages, *args, **kwargs):
        seen.append(advantages.clone())
        return update(policy, optimizer, requests, completions, advantages, *args, **kwargs)

    monkeypatch.setattr(trainer, "build_clusterer", lambda cfg: ByLength())
    monkeypatch.setattr(trainer, "update_policy", recording_update)
    texts, generate = [], trainer.TransformersEngine.generate

    def recording_generate(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        texts.append([o.text for o in out])
        return out

    monkeypatch.setattr(trainer.TransformersEngine, "generate", recording_generate)
    problems = load_problems(coin_task(task, tmp_path / "coin"))
    train_grpo(config(tmp_path / "coin" / "problems.jsonl", tmp_path / "run", "train.max_steps=2",
                      "reward.alpha=0.5"))
    assert len(seen) == 2 and ByLength.calls > 0
    weighted = 0
    for step, (advantages, step_texts) in enumerate(zip(seen, texts)):
        from thinkdiff.train.align import batch_indices

        batch = [problems[i] for i in batch_indices(step, len(problems), 2, 0)]
        k = len(step_texts) // len(batch)
        expected = []
        for g, problem in enumerate(batch):
            group = step_texts[g * k:(g + 1) * k]
            r = torch.tensor([get_verifier("coin")(t, problem.answer) for t in group], dtype=torch.float64)
            z = (r - r.mean()) / (r.std() + 1e-4)
            labels = [len(t) % 3 for t in group]
            w = torch.tensor([labels.count(lab) for lab in labels], dtype=torch.float64) ** -0.5
            expected.append(w * z if len(set(r.tolist())) > 1 else z)
            weighted += int(len(set(r.tolist())) > 1 and not torch.allclose(w * z, z))
        torch.testing.assert_close(advantages, torch.cat(expected).float())
    assert weighted > 0  # some group's weights were not all 1, so this compared w * z with z
