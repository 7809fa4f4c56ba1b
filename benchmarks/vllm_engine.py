"""vLLM engine costs, measured in one run on tiny models (32 requests x 32 tokens by default):

  (a) hidden-state overhead: vLLM generate + layer states vs vLLM generate alone (goal <= 1.15x), for the final
      layer and for 3 layers
  (b) throughput, requests/s: vLLM engine vs transformers engine, both generating and returning states
for tiny Llama (text) and tiny Mllama with one image per request (our vLLM plugin). Every answer runs to
max_new_tokens, so the states are all recorded while generating. Then the same on a copy of the model whose
generation config ends most answers early (end of sequence): each of those runs one decode step more, in the same
batch, so its end token's row is computed too (a forced sentinel stops it; no extra prefill pass).

vLLM runs are interleaved and summarised by their medians (other work may share the CPU). Every timed call gets
prompts of its own, so no call reuses another's prefix cache.

    .venv/bin/python benchmarks/vllm_engine.py [--requests 32] [--tokens 32] [--rounds 5] [--kinds llama mllama]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(kind: str, n: int, tokens: int, rounds: int) -> None:
    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import SamplingConfig, VLMRequest
    from thinkdiff.vlm.transformers_engine import TransformersEngine
    from thinkdiff.vlm.vllm_engine import VLLMEngine

    rng = np.random.RandomState(0)
    calls = itertools.count()

    def fresh():  # same length every call, a different first block
        c = next(calls)
        images = lambda: [Image.fromarray((rng.rand(40, 70, 3) * 255).astype("uint8"))] if kind == "mllama" else []
        return [VLMRequest(f"{c:06d} request {i:02d}: describe what you see in a few words.", images())
                for i in range(n)]

    sampling = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    engine = VLLMEngine(tiny_path(kind))
    last, three = [-1], [0, engine.num_layers // 2, engine.num_layers]
    vllm_s = medians(engine, fresh, sampling, {"generate": [], "generate + final layer": last,
                                               "generate + 3 layers": three}, rounds)
    stop_model = model_that_stops_early(tiny_path(kind), engine, fresh(), sampling)
    mode = "prefix caching on" if engine.prefix_caching else "no prefix caching (encoder-decoder)"
    del engine  # one vLLM engine at a time
    hf = TransformersEngine(tiny_path(kind))
    hf.generate(fresh()[:2], last, sampling)  # warm-up
    hf_s = statistics.median(timed(lambda r=r: hf.generate(r, last, sampling)) for r in (fresh() for _ in range(3)))

    label = ("tiny Llama, text" if kind == "llama" else
             "tiny Mllama, one 70x40 image per request (560-px tiles), vLLM plugin")
    print(f"{label}: {n} requests x {tokens} tokens, float32, {os.cpu_count()} CPU threads; {mode}; "
          f"medians of {rounds} interleaved rounds")
    for name, seconds in vllm_s.items():
        print(f"  vLLM {name:24s} {seconds * 1e3:8.1f} ms  {n / seconds:8.1f} req/s")
    print(f"  (a) states overhead, final layer: {vllm_s['generate + final layer'] / vllm_s['generate']:.2f}x "
          f"(goal <= 1.15x); 3 layers: {vllm_s['generate + 3 layers'] / vllm_s['generate']:.2f}x")
    print(f"  transformers generate + final layer {hf_s * 1e3:8.1f} ms  {n / hf_s:8.1f} req/s")
    print(f"  (b) vLLM / transformers throughput with states: {hf_s / vllm_s['generate + final layer']:.2f}x")

    # Answers that end at end of sequence: one more decode step each (goal <= 1.15x).
    engine = VLLMEngine(stop_model)
    free = SamplingConfig(max_new_tokens=tokens)
    lengths = [len(s.output_token_ids) for s in engine.generate(fresh(), [], free)]
    eos_s = medians(engine, fresh, free, {"generate": [], "generate + final layer": last}, rounds)
    print(f"  answers ending at end of sequence ({sum(n < tokens for n in lengths)}/{len(lengths)} of them, mean "
          f"length {np.mean(lengths):.1f}): states overhead, final layer "
          f"{eos_s['generate + final layer'] / eos_s['generate']:.2f}x (goal <= 1.15x)")


def medians(engine, fresh, sampling, layer_sets: dict[str, list[int]], rounds: int) -> dict[str, float]:
    """Median seconds per call for each set of layers, runs interleaved, every call on fresh prompts."""
    times = {name: [] for name in layer_sets}
    for layers in layer_sets.values():  # warm-up
        engine.generate(fresh(), layers, sampling)
    for _ in range(rounds):
        for name, layers in layer_sets.items():
            requests = fresh()
            times[name].append(timed(lambda r=requests, ls=layers: engine.generate(r, ls, sampling)))
    return {name: statistics.median(t) for name, t in times.items()}


def model_that_stops_early(model: Path, engine, requests, sampling) -> Path:
    """A copy of `model` whose generation config also ends answers at the token its greedy answers hold most often
    (after their first token), so most answers end early at end of sequence."""
    answers = [s.output_token_ids.tolist() for s in engine.generate(requests, [], sampling)]
    stop = Counter(t for a in answers for t in a[1:]).most_common(1)[0][0]
    copy = Path(tempfile.mkdtemp(prefix="thinkdiff-bench-")) / model.name
    shutil.copytree(model, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    eos = config.get("eos_token_id")
    config["eos_token_id"] = ([eos] if isinstance(eos, int) else list(eos or [])) + [stop]
    (copy / "generation_config.json").write_text(json.dumps(config))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["llama", "mllama"], choices=["llama", "mllama"])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    for kind in args.kinds:
        bench(kind, args.requests, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
