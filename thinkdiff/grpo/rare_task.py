"""A task with two solution strategies that a program tells apart: the exploration-collapse experiment's world.

Problems are "add A and B ." over single digits (A in 0..9, B in 1..9). Two strategies solve them, and each answer's
trace shows which one it used:

    recall   "recall 8"                  the sum from memory: short, rarely slips (+-1), but the memory is wrong on
                                         a hidden `hard` share of the pairs: it says A + B + `hard_error` (2) there,
                                         so no supervised trace or slip shows recall the right sum on those pairs
    count    "count 4 5 6 7 8 so 8"      count up B steps from A: each step can slip (+2 instead of +1), and the
                                         count never says ten (9 is followed by 11), so it is right only on sums
                                         below 10 (`count_skips_ten=False`: it says ten, right but for its slips)

Each strategy fails where the other works: the hard pairs all have sums below 10, where counting works, and recall
is the only way to sums of 10 and more. The base policy learns both from supervised traces mixed
`recall_share` : 1 - recall_share (e.g. 85 : 15), so the strategy mix comes from its own training data and the
reward is the verifier's 0/1 alone. Which pairs are hard is not written in the problem. Plain GRPO is expected to
favour recall everywhere (pass@1 up: counting is never right on half the pairs), and to lose count on the hard
pairs (pass@k at large k down); uniqueness weighting keeps the rare correct count traces alive.

`method_of(text)` is the programmatic strategy judge (`reward.judge=addition-method`): it reads the method from the
trace and never looks at correctness.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .strategies import register_judge

METHODS = ("recall", "count")
# every word a prompt or a trace of the task uses (the base policy's vocabulary)
VOCABULARY = ["add and . recall count so", " ".join(str(i) for i in range(30))]


@dataclass(frozen=True)
class AdditionTask:
    hard: float = 0.2  # share of all pairs recall gets wrong (drawn among the sums below 10)
    hard_error: int = 2  # recall says A + B + hard_error on them: no +-1 slip lands on the right sum
    recall_share: float = 0.85  # share of recall traces in the supervised data
    recall_slip: float = 0.03  # chance that a recall trace's sum is off by one
    count_slip: float = 0.04  # chance per counting step of a +2 step
    count_skips_ten: bool = True  # the count goes 9, 11: right only on sums below 10 (False: right everywhere)
    heldout: float = 1 / 3  # share of pairs held out of GRPO training, for evaluation
    seed: int = 0

    def pairs(self) -> list[tuple[int, int]]:
        return _pairs()

    def hard_pairs(self) -> frozenset[tuple[int, int]]:
        """The pairs whose remembered sum is wrong, a fixed function of the seed, in both splits alike."""
        return _hard_pairs(self.hard, self.seed)

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(training pairs, held-out pairs): disjoint, each with its share of hard pairs."""
        rng = random.Random(f"addition-split/{self.seed}")
        hard = self.hard_pairs()
        train, held = [], []
        for group in ([p for p in self.pairs() if p in hard], [p for p in self.pairs() if p not in hard]):
            group = group[:]
            rng.shuffle(group)
            cut = round(self.heldout * len(group))
            held += group[:cut]
            train += group[cut:]
        return sorted(train), sorted(held)

    def trace(self, a: int, b: int, method: str, rng: random.Random) -> str:
        """One supervised solution of `add a and b .` with `method`, slips included."""
        if method == "recall":
            value = a + b + (self.hard_error if (a, b) in self.hard_pairs() else 0)
            if rng.random() < self.recall_slip:
                value += rng.choice((-1, 1))
            return f"recall {value}"
        steps, value = [], a
        for _ in range(b):
            value += 2 if rng.random() < self.count_slip else 1
            if self.count_skips_ten and value == 10:
                value += 1
            steps.append(str(value))
        return f"count {' '.join(steps)} so {value}"

    def sft_examples(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """n (prompt, trace) pairs over all pairs, recall with probability `recall_share`."""
        rng = random.Random(f"addition-sft/{self.seed}/{seed}")
        pairs = self.pairs()
        out = []
        for _ in range(n):
            a, b = rng.choice(pairs)
            method = "recall" if rng.random() < self.recall_share else "count"
            out.append((prompt(a, b), self.trace(a, b, method, rng)))
        return out

    def write_problems(self, out_dir: str | Path) -> tuple[Path, Path]:
        """`train.jsonl` and `heldout.jsonl` in the problem format GRPO and eval-passk read; returns both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hard = self.hard_pairs()
        paths = []
        for name, pairs in zip(("train", "heldout"), self.split()):
            rows = [{"id": f"add-{a}-{b}", "prompt": prompt(a, b), "answer": str(a + b), "verifier": "numeric",
                     "hard": (a, b) in hard} for a, b in pairs]
            path = out_dir / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths.append(path)
        return paths[0], paths[1]


def _pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10) for b in range(1, 10)]


@cache  # trace() asks for every recall trace
def _hard_pairs(share: float, seed: int) -> frozenset[tuple[int, int]]:
    below_ten = [(a, b) for a, b in _pairs() if a + b < 10]  # where counting works
    return frozenset(random.Random(f"addition-hard/{seed}").sample(below_ten, round(share * len(_pairs()))))


def prompt(a: int, b: int) -> str:
    return f"add {a} and {b} ."


def method_of(text: str) -> str:
    """The strategy a trace used: its first word when that names a method, else "other"."""
    words = text.split()
    return words[0] if words and words[0] in METHODS else "other"


class AdditionMethodJudge:
    """The programmatic strategy judge: one cluster per method named by the trace (correctness unseen)."""

    calls = 0

    def cluster(self, problem: str, solutions: list[str]) -> list[int]:
        self.calls += 1
        names = [method_of(s) for s in solutions]
        order = list(dict.fromkeys(names))
        return [order.index(n) for n in names]


register_judge("addition-method", AdditionMethodJudge)
