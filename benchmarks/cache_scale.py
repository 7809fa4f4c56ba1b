"""The feature cache on 1 and 2 processes: samples/s (ratio), and bytes per sample of the bf16 cache beside
ThinkDiff's release.

    .venv/bin/python benchmarks/cache_scale.py [--samples 64] [--tokens 16]

Writes the toy dataset's features with the tiny Mllama (configs/align_tiny.yaml) twice, with `python -m thinkdiff
cache` and with `accelerate launch --multi_gpu --num_processes 2 -m thinkdiff cache` (one CPU thread per process,
so both use the same 2 cores), and checks that the two caches hold the same tensors. samples/s counts the
processes' own extraction time (each rank's report), wall time is printed beside it (it adds model loading).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THINKDIFF_BYTES = 2.3e12 / 1.7e6  # 4,653 shards x <= 500 MB (its config) over ~1.7M CC3M+CC12M+SBU images: estimate


def run(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16, help="answer tokens (max = min new tokens)")
    args = parser.parse_args()
    from safetensors import safe_open

    from thinkdiff.train.toy_dataset import write_toy_dataset

    work = Path(tempfile.mkdtemp(prefix="cache_scale_"))
    data = write_toy_dataset(work / "toy", n=args.samples)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    common = ["-m", "thinkdiff", "cache", "--config", str(ROOT / "configs" / "align_tiny.yaml"),
              f"data.source={data}", f"vlm.max_new_tokens={args.tokens}", f"vlm.min_new_tokens={args.tokens}",
              "train.cache_dtype=bfloat16", "train.cache_shard_size=8"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results = {}
    for processes, prefix in ((1, [sys.executable]), (2, launch)):
        out = work / f"cache{processes}"
        wall = run([*prefix, *common, f"train.cache={out}"], dict(env, OMP_NUM_THREADS=str(2 // processes)))
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob(f"rank-*-of-{processes:03d}.json"))]
        seconds = max(r["seconds"] for r in ranks)
        size = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
        results[processes] = (args.samples / seconds, wall, size)

    def tensors(out):
        got = {}
        for path in sorted(out.glob("shard-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                got.update({k: f.get_tensor(k) for k in f.keys()})
        return got

    one, two = tensors(work / "cache1"), tensors(work / "cache2")
    same = one.keys() == two.keys() and all((one[k] == two[k]).all() for k in one)
    (rate1, wall1, size), (rate2, wall2, _) = results[1], results[2]
    per_sample = size / args.samples
    print(f"feature cache, tiny Mllama (hidden 128), {args.samples} toy images, {args.tokens}-token answers, bf16:")
    print(f"  1 process:   {rate1:6.2f} samples/s ({wall1:.1f} s wall, 2 threads)")
    print(f"  2 processes: {rate2:6.2f} samples/s ({wall2:.1f} s wall, 1 thread each)   ratio {rate2 / rate1:.2f}")
    print(f"  caches identical: {same}")
    print(f"  bytes per sample: {per_sample:,.0f} here (output states only, {args.tokens} x 128 bf16 + token ids); "
          f"at Llama-3.2-11B-Vision's width 4096 and 128 answer tokens: {128 * 4096 * 2 + 128 * 8:,} "
          f"(estimate); ThinkDiff's release: ~{THINKDIFF_BYTES:,.0f} (image + prompt and answer states, estimate)")


if __name__ == "__main__":
    main()
