"""The exploration-collapse experiment: its two-strategy task, the program judge, and the command end to end."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from thinkdiff.config import GRPOTrainConfig, load_config
from thinkdiff.errors import ConfigError
from thinkdiff.grpo.rare_experiment import rand_index
from thinkdiff.grpo.rare_task import AdditionMethodJudge, AdditionTask, method_of
from thinkdiff.grpo.verifiers import get_verifier

ROOT = Path(__file__).resolve().parents[1]


def test_splits_are_disjoint_and_both_hold_hard_pairs():
    task = AdditionTask()
    train, held = task.split()
    hard = task.hard_pairs()
    assert not set(train) & set(held) and len(train) + len(held) == 90
    assert len(hard) == 18 and 0 < len(hard & set(held)) < len(hard)
    assert len(hard & set(held)) == round(18 / 3)  # each split keeps its share of the hard pairs
    assert task.split() == AdditionTask().split() and AdditionTask(seed=1).split() != task.split()


def test_traces_show_their_method_and_fail_where_designed():
    task = AdditionTask(recall_slip=0.0, count_slip=0.0)
    verify, rng = get_verifier("numeric"), random.Random(0)
    for a, b in task.pairs():
        recall, count = task.trace(a, b, "recall", rng), task.trace(a, b, "count", rng)
        assert method_of(recall) == "recall" and method_of(count) == "count"
        assert verify(recall, str(a + b)) == (0.0 if (a, b) in task.hard_pairs() else 1.0)  # memory wrong on hard
        assert verify(count, str(a + b)) == float(a + b < 10) and len(count.split()) == b + 3  # never says ten
        assert (a, b) not in task.hard_pairs() or a + b < 10  # every pair has a strategy that works
    tens = AdditionTask(count_slip=0.0, count_skips_ten=False)  # counting that says ten is right everywhere
    for a, b in tens.pairs():
        count = tens.trace(a, b, "count", rng)
        assert verify(count, str(a + b)) == 1.0 and count.split()[1:-2] == [str(a + i) for i in range(1, b + 1)]
    slipping = AdditionTask(count_slip=1.0, recall_slip=1.0)
    assert slipping.trace(2, 3, "count", rng) == "count 4 6 8 so 8"
    for a, b in slipping.hard_pairs():  # a slipped memory never lands on the right sum: recall cannot be repaired
        assert {verify(slipping.trace(a, b, "recall", rng), str(a + b)) for _ in range(8)} == {0.0}
    mix = [method_of(t) for _, t in AdditionTask().sft_examples(4000)]
    assert mix.count("recall") / len(mix) == pytest.approx(0.85, abs=0.02)


def test_program_judge_groups_by_method_never_by_correctness():
    judge = AdditionMethodJudge()
    texts = ["recall 8", "count 4 5 6 so 6", "recall 9", "nonsense", "count 4 6 so 6", "recall 8"]
    assert judge.cluster("add 3 and 5 .", texts) == [0, 1, 0, 2, 1, 0]
    assert rand_index([0, 1, 0, 2], [0, 1, 0, 2]) == 1.0 and rand_index([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / 3)


def test_the_program_judge_is_a_reward_judge_choice():
    from thinkdiff.grpo.trainer import build_clusterer

    cfg = load_config(GRPOTrainConfig, None, ["reward.judge=addition-method", "reward.alpha=1"])
    assert isinstance(build_clusterer(cfg.reward), AdditionMethodJudge)
    with pytest.raises(ConfigError, match="'gpt' is not a judge; choose one of .*addition-method"):
        load_config(GRPOTrainConfig, None, ["reward.judge=gpt"])


def test_rare_experiment_quick_writes_every_method_and_resumes(tmp_path):
    """`rare-experiment --quick`: base, grpo, rare-0.5 and rare-1 in summary.json with pass@1..n curves that agree
    with the per-seed numbers, a plot, the judges' agreement; a second run reuses everything."""
    out = tmp_path / "rare"
    command = [sys.executable, "-m", "thinkdiff", "rare-experiment", "--config", str(ROOT / "configs" /
               "rare_mini.yaml"), "--out", str(out), "--quick"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    n = summary["n"]
    assert set(summary["curves"]) == {"base", "grpo", "rare-0.5", "rare-1"} == set(summary["auc"])
    for method, curve in summary["curves"].items():
        assert len(curve) == n and all(x <= y + 1e-12 for x, y in zip(curve, curve[1:]))  # pass@k rises with k
        seed = summary["per_seed"][method]["0"]
        assert seed["pass@1"] == pytest.approx(curve[0]) and seed[f"pass@{n}"] == pytest.approx(curve[-1])
        # each problem with a right answer has 1 to 3 methods among them (recall, count, other); pass@n is the share
        # of problems with one
        assert curve[-1] - 1e-9 <= summary["strategies"][method] <= 3.0
    for method in ("grpo", "rare-0.5", "rare-1"):  # each trained from the one base, for the configured steps
        log = [json.loads(line) for line in (out / method / "seed-0" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3]
    assert 0.0 <= summary["judge_agreement"]["rand_index"] <= 1.0 and summary["judge_agreement"]["groups"] == 60
    assert (out / "passk.png").stat().st_size > 1000 and "| rare-1 |" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "supervised" not in again.stderr and "grpo:" not in again.stderr
    assert json.loads((out / "summary.json").read_text())["curves"] == summary["curves"]
