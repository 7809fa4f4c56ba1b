"""The README's miniature table: CoBSAT on mini-CoBSAT with the shipped miniature (configs/eval_cobsat_mini.yaml),
every method under the oracle judge, the same images again under the CNN judge, the judges' agreement, and one
table beside ThinkDiff's published Tables 1-2.

    .venv/bin/python benchmarks/mini_cobsat.py [--out runs/mini_cobsat] [--n 100] [--methods thinkdiff ...]
        [--tag NAME key.sub=value ...]     # e.g. --tag input-embed aligner.path=runs/x/aligner (an ablation row)

Run folders resume: re-running finishes what an interrupted run left.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluate(out: Path, method: str, judge: str, n: int, overrides: list[str], images_from: Path | None = None):
    from thinkdiff.config import load_config
    from thinkdiff.eval.config import CobsatEvalConfig
    from thinkdiff.eval.harness import run_cobsat

    if images_from is not None and not (out / "results").exists():
        shutil.copytree(images_from / "results", out / "results")
    config = load_config(CobsatEvalConfig, ROOT / "configs" / "eval_cobsat_mini.yaml", [
        f"cobsat.root={out.parent / 'data'}", f"cobsat.n={n}", f"cobsat.method={method}", f"judge.kind={judge}",
        *overrides])
    return run_cobsat(config, out)["summary"]


def row(name: str, summary: dict, shot: int) -> str:
    from thinkdiff.eval.summary import PAPER_COLUMNS

    tasks = summary["shots"][shot]["tasks"]
    cells = [f"{tasks[t]['overall']:.3f}" for t in PAPER_COLUMNS]
    return f"| {name} | " + " | ".join(cells) + f" | **{summary['shots'][shot]['mean']['overall']:.3f}** |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mini_cobsat")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=["thinkdiff", "text-bridge", "oracle", "random"])
    parser.add_argument("--tag", default=None, help="name of this variant's run folders (with overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from thinkdiff.eval.agreement import judge_agreement
    from thinkdiff.eval.mini_cobsat import write_mini_cobsat
    from thinkdiff.eval.summary import PAPER_COLUMNS, PUBLISHED, SHORT_NAMES

    out = Path(args.out)
    if not (out / "data").is_dir():
        write_mini_cobsat(out / "data")
    lines, agreement = {2: [], 4: []}, []
    for method in args.methods:
        name = method if args.tag is None else f"{method}-{args.tag}"
        by_oracle = evaluate(out / name, method, "oracle", args.n, args.overrides)
        by_cnn = evaluate(out / f"{name}-cnn", method, "cnn", args.n, args.overrides, images_from=out / name)
        for shot in (2, 4):
            lines[shot] += [row(f"{name}, oracle judge", by_oracle, shot), row(f"{name}, CNN judge", by_cnn, shot)]
        a = judge_agreement(out / name, out / f"{name}-cnn")
        agreement.append(f"| {name} | {a['samples']} | {a['answers_agree']:.3f} | {a['correct_agree']:.3f} |")
    head = ("| | " + " | ".join(SHORT_NAMES[t] for t in PAPER_COLUMNS) + " | mean |\n|---"
            + "|---" * (len(PAPER_COLUMNS) + 1) + "|")
    text = []
    for shot in (2, 4):
        v = PUBLISHED[shot]["ThinkDiff-LVLM"]  # in PAPER_COLUMNS order
        published = [f"| ThinkDiff-LVLM (published, Table {1 if shot == 2 else 2}) | "
                     + " | ".join(f"{x:.3f}" for x in v) + f" | {sum(v) / 10:.3f} |"]
        text += [f"{shot}-shot, n = {args.n} per task", "", head, *lines[shot], *published, ""]
    text += ["Judge agreement (oracle vs CNN, same images)", "",
             "| images of | samples | same option per question | same verdict per sample |", "|---|---|---|---|",
             *agreement, ""]
    (out / (f"table-{args.tag}.md" if args.tag else "table.md")).write_text("\n".join(text))
    print("\n".join(text))
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
