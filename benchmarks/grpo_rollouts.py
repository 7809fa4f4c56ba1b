"""GRPO costs on one tiny policy, measured in one run: rollout throughput (completions/s) of the vLLM engine vs
the transformers engine, and the strategy judge's cost per group (embedding clusterer vs an LLM judge engine).

    .venv/bin/python benchmarks/grpo_rollouts.py [--groups 4] [--group-size 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def timed(fn, repeat=1):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--model", default="llama", help="tiny model kind used as policy (text: llama)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from thinkdiff.grpo.strategies import EmbeddingClusterer, LLMJudgeClusterer, engine_ask
    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import SamplingConfig, VLMRequest
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    requests = [VLMRequest(f"What is {g} plus {g + 1}? Answer with a number.")
                for g in range(args.groups) for _ in range(args.group_size)]
    sampling = SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True, seed=0)
    n = len(requests)
    hf = TransformersEngine(tiny_path(args.model))
    hf_s = timed(lambda: hf.generate(requests, [], sampling), repeat=2)
    print(f"rollouts: {args.groups} groups x {args.group_size} samples x {args.tokens} tokens, tiny {args.model}")
    print(f"  transformers  {n / hf_s:8.1f} completions/s")
    try:
        from thinkdiff.vlm.vllm_engine import VLLMEngine

        vllm_engine = VLLMEngine(tiny_path(args.model))
        vllm_s = timed(lambda: vllm_engine.generate(requests, [], sampling), repeat=2)
        print(f"  vllm          {n / vllm_s:8.1f} completions/s   (vllm / transformers: {hf_s / vllm_s:.2f}x)")
    except ImportError as err:
        print(f"  vllm          not available ({err})")

    texts = [o.text or "x" for o in hf.generate(requests[:args.group_size], [], sampling)]
    embed = EmbeddingClusterer()
    embed_s = timed(lambda: embed.cluster("q", texts), repeat=5)
    judge = LLMJudgeClusterer(engine_ask(hf, max_new_tokens=128), fallback=embed)
    judge_s = timed(lambda: judge.cluster("q", texts), repeat=2)
    print(f"judge cost per group of {args.group_size}:")
    print(f"  embedding clusterer (MiniLM)       {embed_s * 1000:8.1f} ms")
    print(f"  LLM judge (tiny {args.model}, 128 tokens) {judge_s * 1000:8.1f} ms   ({judge_s / embed_s:.1f}x the "
          f"embedding clusterer; {judge.failures}/{judge.calls} replies fell back)")


if __name__ == "__main__":
    main()
