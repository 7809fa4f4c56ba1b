"""How often two judges agree on the same images: `python -m thinkdiff cobsat-agreement RUN_A RUN_B`.

RUN_B is an `eval-cobsat` run whose images are RUN_A's (copy RUN_A/results into RUN_B before running it with the
other judge: the harness judges images already on disk instead of drawing them). Samples pair up by key and must
carry the same image (sha1); each of CoBSAT's two questions (detail, object) counts once.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .harness import load_records


def judge_agreement(run_a: str | Path, run_b: str | Path) -> dict:
    """{"samples", "answers_agree" (share of questions answered with the same option), "correct_agree" (share of
    samples both call right or both call wrong), "accuracy_a", "accuracy_b", "judge_a", "judge_b"}."""
    a = {r["key"]: r for r in load_records(Path(run_a) / "records.jsonl") if r["image_sha1"]}
    b = {r["key"]: r for r in load_records(Path(run_b) / "records.jsonl") if r["image_sha1"]}
    keys = sorted(a.keys() & b.keys())
    if not keys:
        raise InputError(f"{run_a} and {run_b} share no judged sample.")
    differ = [k for k in keys if a[k]["image_sha1"] != b[k]["image_sha1"]]
    if differ:
        raise InputError(f"{len(differ)} samples have different images in the two runs (first: {differ[0]}); copy "
                         f"{run_a}/results into the second run before judging.")
    answers = [a[k][f"answer_{q}"] == b[k][f"answer_{q}"] for k in keys for q in ("detail", "obj")]
    return {"samples": len(keys), "judge_a": a[keys[0]]["judge"], "judge_b": b[keys[0]]["judge"],
            "answers_agree": sum(answers) / len(answers),
            "correct_agree": sum(a[k]["correct"] == b[k]["correct"] for k in keys) / len(keys),
            "accuracy_a": sum(a[k]["correct"] for k in keys) / len(keys),
            "accuracy_b": sum(b[k]["correct"] for k in keys) / len(keys)}
