"""vLLM engine costs, measured in one run on tiny models (32 requests each):

  1. hidden-state extraction overhead: vLLM generate + layer states vs vLLM generate alone (goal <= 1.15x)
  2. throughput, requests/s: vLLM engine vs transformers engine, same requests and tokens
for tiny Llama (text) and tiny Mllama with one image per request (our vLLM plugin).

    .venv/bin/python benchmarks/vllm_engine.py [--requests 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
from PIL import Image

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def best_of(fn, repeat=3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from thinkdiff.tiny import tiny_path
    from thinkdiff.vlm import SamplingConfig, VLMRequest
    from thinkdiff.vlm.transformers_engine import TransformersEngine
    from thinkdiff.vlm.vllm_engine import VLLMEngine

    sampling = SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    rng = np.random.RandomState(0)
    for kind in ("llama", "mllama"):
        images = lambda i: [Image.fromarray((rng.rand(40, 70, 3) * 255).astype("uint8"))] if kind == "mllama" else []
        requests = [VLMRequest(f"Request {i}: describe what you see in a few words.", images(i))
                    for i in range(args.requests)]
        vllm_engine = VLLMEngine(tiny_path(kind))
        hf = TransformersEngine(tiny_path(kind))
        vllm_engine.progress = hf.progress = False
        gen = best_of(lambda: vllm_engine.generate(requests, [], sampling))
        gen_states = best_of(lambda: vllm_engine.generate(requests, [-1], sampling))
        hf_states = best_of(lambda: hf.generate(requests, [-1], sampling), repeat=1)
        n = len(requests)
        label = "tiny Llama, text" if kind == "llama" else "tiny Mllama, 1 image (4 tiles) per request, vLLM plugin"
        print(f"{label}: {n} requests x {args.tokens} tokens")
        print(f"  vLLM generate                 {n / gen:8.1f} req/s")
        print(f"  vLLM generate + layer states  {n / gen_states:8.1f} req/s   overhead {gen_states / gen:.2f}x")
        print(f"  transformers generate + states{n / hf_states:8.1f} req/s   vLLM / transformers "
              f"{hf_states / gen_states:.2f}x")


if __name__ == "__main__":
    main()
