"""ThinkDiff's ablations in miniature (paper Table 3 and Fig. 7), as `train.py` overrides of its alignment stage on the
shipped miniature (configs/align_mini.yaml, or a train-mini folder's OUT_DIR/align_mini.yaml):

    generated   the recipe: generated-token states, RMSNorm initialised from the T5 encoder's final norm (the config's
                own run folder and cache, so `train.py --config configs/align_mini.yaml` done first is reused)
    input       prompt-token states (`embed=input`, its own feature cache)          -- paper Table 3, "input tokens"
    norm-ones   RMSNorm initialised to ones (`objective.norm_init=ones`)             -- paper Fig. 7, "default init"
    no-split    every answer state in, the whole answer out (`objective.split=false`) -- paper Table 3, "w/o masked
                training" (its loss is a reconstruction loss, not comparable with the others')

    .venv/bin/python -m thinkdiff make-mini-captions data/mini-captions      # the data configs/align_mini.yaml reads
    .venv/bin/python benchmarks/mini_ablations.py [--config configs/align_mini.yaml] [--out runs/mini_ablations]
        [key.sub=value ...]    # for every variant, e.g. train.max_steps=500 (then all of them train under --out)

Prints, per variant, the loss over the first and last 5% of steps, its largest step-to-step jump and its spread over
the last 20% (the stability Fig. 7 is about), writes `losses.png`, and the aligner folders that
`benchmarks/mini_cobsat.py --tag NAME aligner.path=DIR` scores on CoBSAT. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

VARIANTS = {"generated": [], "input": ["embed=input"], "norm-ones": ["objective.norm_init=ones"],
            "no-split": ["objective.split=false"]}


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)


def stability(losses: np.ndarray) -> dict:
    span = max(1, len(losses) // 20)
    tail = losses[-max(1, len(losses) // 5):]
    return {"first": float(losses[:span].mean()), "last": float(losses[-span:].mean()),
            "max_jump": float(np.abs(np.diff(losses)).max()), "tail_std": float(tail.std())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "align_mini.yaml"))
    parser.add_argument("--out", default="runs/mini_ablations")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    out, config = Path(args.out), args.config
    runs = {}
    recipe = yaml.safe_load(Path(config).read_text())["train"]
    for name, overrides in VARIANTS.items():
        # the recipe trains in its own folders; variants beside each other under --out, sharing the recipe's
        # generated-token cache unless they read other states
        run_dir = Path(recipe["output_dir"]) if not overrides and not args.overrides else out / name
        cache = out / "cache-input" if "embed=input" in overrides else Path(recipe["cache"])
        extra = [*args.overrides, f"train.output_dir={run_dir}", f"train.cache={cache}"]
        run("-m", "thinkdiff", "cache", "--config", config, *overrides, *extra)  # skips finished shards
        if not (run_dir / "aligner").is_dir():
            run("train.py", "--config", config, *overrides, *extra)
        runs[name] = run_dir

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print("| variant | loss first 5% | loss last 5% | largest step-to-step jump | std over last 20% | aligner |")
    print("|---|---|---|---|---|---|")
    for name, run_dir in runs.items():
        losses = np.loadtxt(run_dir / "losses.txt")
        s = stability(losses)
        print(f"| {name} | {s['first']:.3f} | {s['last']:.3f} | {s['max_jump']:.3f} | {s['tail_std']:.3f} | "
              f"{run_dir / 'aligner'} |")
        plt.plot(losses, label=name, linewidth=0.8)
    plt.xlabel("step")
    plt.ylabel("T5 decoder loss")
    plt.yscale("log")
    plt.legend()
    plt.title("Alignment in miniature: state choice and RMSNorm init")
    out.mkdir(parents=True, exist_ok=True)
    plt.savefig(out / "losses.png", dpi=120)
    print(f"curves: {out / 'losses.png'}")


if __name__ == "__main__":
    main()
