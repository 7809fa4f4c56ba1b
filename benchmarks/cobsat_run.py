"""Throughput and time split of a CoBSAT run on a mini-CoBSAT: samples/s and the VLM / aligner / decoder / judge
shares of the run's wall time (the rest is image I/O, records and bookkeeping).

    .venv/bin/python benchmarks/cobsat_run.py [--tasks 1 2] [--shots 2 4] [--n 4] [--batch-size 4] [key.sub=value ...]

Defaults: configs/eval_cobsat_tiny.yaml (tiny Mllama -> untrained aligner -> tiny FLUX 64 px, 2 steps; tiny Mllama
judging through the transformers engine), a fresh mini-CoBSAT and a fresh run folder in a temp dir. Model loading is
timed separately and not counted in samples/s. With real models the decoder (28 FLUX steps at 512 px) and the
13B judge's two questions per image dominate; on the tiny models the per-sample overheads show.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "eval_cobsat_tiny.yaml"))
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 7])
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="thinkdiff")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    import torch
    import yaml

    torch.set_num_threads(args.threads)

    from thinkdiff.config import apply_overrides, from_dict
    from thinkdiff.eval.config import CobsatEvalConfig
    from thinkdiff.eval.harness import run_cobsat
    from thinkdiff.eval.mini_cobsat import write_mini_cobsat

    with tempfile.TemporaryDirectory(prefix="cobsat-bench-") as tmp:
        root = write_mini_cobsat(Path(tmp) / "mini")
        data = yaml.safe_load(Path(args.config).read_text())
        config = from_dict(CobsatEvalConfig, apply_overrides(data, [
            f"cobsat.root={root}", f"cobsat.tasks={args.tasks}", f"cobsat.shots={args.shots}", f"cobsat.n={args.n}",
            f"cobsat.batch_size={args.batch_size}", f"cobsat.method={args.method}", "cobsat.sheets=false",
            *args.overrides]))
        stats = run_cobsat(config, Path(tmp) / "run", progress=False)["stats"]

    wall = stats["wall_s"]
    print(f"CoBSAT run on mini-CoBSAT ({Path(args.config).name}, method {args.method}): {stats['samples']} samples "
          f"({len(args.tasks)} tasks x {len(args.shots)} shots x {args.n}), batch {args.batch_size}")
    print(f"  model loading   {stats['load_s']:.1f} s (not counted)")
    print(f"  throughput      {stats['samples_per_s']:.2f} samples/s ({wall / max(stats['samples'], 1) * 1000:.0f} ms "
          f"per sample, {wall:.1f} s)")
    other = wall - sum(stats[f"{s}_s"] for s in ("vlm", "aligner", "decoder", "judge"))
    for stage in ("vlm", "aligner", "decoder", "judge"):
        seconds = stats[f"{stage}_s"]
        print(f"  {stage:8s} {seconds / wall:6.3f}  ({seconds / max(stats['samples'], 1) * 1000:.1f} ms per sample)")
    print(f"  {'other':8s} {other / wall:6.3f}  (image I/O, records, bookkeeping)")


if __name__ == "__main__":
    main()
