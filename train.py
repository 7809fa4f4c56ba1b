"""Train ThinkDiff. The config's `stage` picks what is trained:

    align   the aligner (VLM and decoder frozen): objectives t5_decoder (ThinkDiff), diffusion, regression
    grpo    the VLM policy, GRPO with uniqueness-weighted advantages ("Rewarding the Rare")

    python train.py --config configs/align_tiny.yaml                       # one CPU or GPU
    accelerate launch --num_processes 4 train.py --config configs/align_tiny.yaml train.max_steps=25000   # 4 GPUs
    python train.py --config configs/align_tiny.yaml train.resume=latest   # continue exactly where it stopped
    python train.py --config configs/align_tiny.yaml train.overwrite=true  # start over in the same output_dir
    python train.py --config configs/grpo_tiny.yaml
    accelerate launch --num_processes 2 train.py --config configs/grpo_tiny.yaml   # whole groups per process

On a host without a GPU, `accelerate launch --multi_gpu --num_processes N` runs N CPU processes in one gloo group.
A run owns its train.output_dir: another run's checkpoints there are an error unless resume or overwrite is set.
Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from thinkdiff.user_errors import exit_status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from thinkdiff.config import load_training_config

    cfg = load_training_config(args.config, args.overrides)
    if cfg.stage == "align":
        from thinkdiff.train.align import train_aligner

        final = train_aligner(cfg)
    else:
        from thinkdiff.grpo.trainer import train_grpo

        final = train_grpo(cfg)
    print(f"Wrote {final}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
