"""Time split of `python infer.py` on configs/tiny.yaml (the tiny random models): VLM, aligner, decoder as fractions
of the total.

    .venv/bin/python benchmarks/infer_time_split.py [--runs 5] [key.sub=value ...]

The first call (warm-up) is not counted. With the tiny default the aligner (128 -> 4096 -> 4096, 33.6 M
multiply-adds per token) is not small next to a 4-layer VLM and a 2-layer FLUX; with real models (an 11B VLM, a
12B DiT) the same aligner is a rounding error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from thinkdiff.pipeline import ThinkDiffPipeline

    pipe = ThinkDiffPipeline.from_config(args.config, args.overrides)
    prompt = "Create an image of a red apple on a wooden table in soft morning light."
    pipe(prompt, seed=0, progress=False)  # warm-up
    totals = {"vlm": 0.0, "aligner": 0.0, "decoder": 0.0}
    for run in range(args.runs):
        for stage, seconds in pipe(prompt, seed=run, progress=False).timings.items():
            totals[stage] += seconds
    whole = sum(totals.values())
    print(f"infer time split over {args.runs} runs ({whole / args.runs * 1000:.1f} ms per run, config "
          f"{Path(args.config).name}):")
    for stage, seconds in totals.items():
        print(f"  {stage:8s} {seconds / whole:6.3f}  ({seconds / args.runs * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
