"""Alignment-training throughput: samples/s reading the feature cache vs running the VLM live, in one run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--samples 32]

Same tiny models, data, objective (t5_decoder) and batch; only where the VLM states come from differs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cfg_data, steps):
    from thinkdiff.config import AlignTrainConfig, from_dict
    from thinkdiff.train.align import train_aligner

    cfg = from_dict(AlignTrainConfig, cfg_data)
    cfg.train.max_steps = steps
    start = time.perf_counter()
    train_aligner(cfg)
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from thinkdiff.config import AlignTrainConfig, apply_overrides, from_dict
    from thinkdiff.train.data import ImageCaptionDataset
    from thinkdiff.train.feature_cache import write_cache
    from thinkdiff.train.toy_dataset import write_toy_dataset
    from thinkdiff.vlm import make_engine, sampling_from

    tmp = Path(tempfile.mkdtemp(prefix="thinkdiff-bench-"))
    data = write_toy_dataset(tmp / "data", args.samples)
    base = apply_overrides(yaml.safe_load((ROOT / "configs" / "align_tiny.yaml").read_text()),
                           [f"data.source={data}", "decoder=null", "train.checkpoint_every=0",
                            "train.log_every=1000"])
    cfg = from_dict(AlignTrainConfig, base)
    start = time.perf_counter()
    dataset = ImageCaptionDataset(data, cfg.data.prompts)
    write_cache(make_engine(cfg.vlm), dataset, tmp / "cache", cfg.layer, cfg.embed, sampling_from(cfg.vlm),
                vlm_name=cfg.vlm.model)
    cache_seconds = time.perf_counter() - start
    live = run(apply_overrides(yaml.safe_load(yaml.safe_dump(base)), [f"train.output_dir={tmp / 'live'}"]),
               args.steps)
    cached = run(apply_overrides(yaml.safe_load(yaml.safe_dump(base)),
                                 [f"train.output_dir={tmp / 'cached'}", f"train.cache={tmp / 'cache'}"]), args.steps)
    print(f"align training, t5_decoder, batch {cfg.train.batch_size}, {args.steps} steps, tiny models:")
    print(f"  live VLM extraction  {live:8.1f} samples/s")
    print(f"  feature cache        {cached:8.1f} samples/s   (writing the cache: {cache_seconds:.1f} s for "
          f"{args.samples} samples)")
    print(f"  cache / live ratio   {cached / live:8.2f}x")


if __name__ == "__main__":
    main()
