"""Load test of `python -m thinkdiff serve`: N concurrent clients for T seconds, a mix of short and long calls,
against a server in this process (loopback, port 0) on the embedded tiny Llama.

    .venv/bin/python benchmarks/serve_load.py [--backend transformers|vllm] [--clients 16] [--seconds 20]

Prints throughput (calls/s, generated tokens/s), p50/p99 latency of short and long calls, failures, whether every
answer equals the in-process engine's, and how much one long call delays a short one that arrives while it runs
(goal of issue 16: <= 2x the short call's own time). On transformers the server runs calls one at a time, so a
short call waits for the long one; on vLLM it joins the long one's running batch.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--long-share", type=float, default=0.2, help="share of long calls")
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from thinkdiff.serve import HiddenStateServer
    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import SamplingConfig, VLMRequest
    from thinkdiff.vlm.remote_engine import RemoteEngine
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    if args.backend == "vllm":
        from thinkdiff.vlm.vllm_engine import VLLMEngine

        engine = VLLMEngine(tiny_path("llama"), max_new_tokens=args.long_tokens)
    else:
        engine = TransformersEngine(tiny_path("llama"))
    kinds = {"short": SamplingConfig(max_new_tokens=args.short_tokens, min_new_tokens=args.short_tokens),
             "long": SamplingConfig(max_new_tokens=args.long_tokens, min_new_tokens=args.long_tokens)}
    prompts = [f"Describe picture {i}: a red apple {'on a wooden table ' * (i % 4)}in soft light." for i in range(8)]
    expected = {(kind, p): engine.generate([VLMRequest(p)], [-1], s, progress=False)[0]
                for kind, s in kinds.items() for p in prompts}

    with HiddenStateServer(engine, port=0, backend=args.backend).start() as server:
        RemoteEngine(server.url).generate([VLMRequest(prompts[0])], [-1], kinds["short"])  # warm-up

        # 1. how long a short call takes alone, and while a long call runs
        alone = []
        for p in prompts[:5]:
            start = time.perf_counter()
            RemoteEngine(server.url).generate([VLMRequest(p)], [-1], kinds["short"])
            alone.append(time.perf_counter() - start)
        long_alone_start = time.perf_counter()
        RemoteEngine(server.url).generate([VLMRequest(prompts[1])], [-1], kinds["long"])
        long_alone = time.perf_counter() - long_alone_start
        with ThreadPoolExecutor(2) as pool:
            pool.submit(RemoteEngine(server.url).generate, [VLMRequest(prompts[1])], [-1], kinds["long"])
            time.sleep(0.1 * long_alone)
            start = time.perf_counter()
            RemoteEngine(server.url).generate([VLMRequest(prompts[2])], [-1], kinds["short"])
            behind_long = time.perf_counter() - start

        # 2. N clients for T seconds
        latencies = {"short": [], "long": []}
        failures, mismatches, tokens = [], [], [0]
        lock = threading.Lock()
        stop = time.perf_counter() + args.seconds

        def client(index: int) -> None:
            rng = random.Random(index)
            remote = RemoteEngine(server.url, timeout=600)
            while time.perf_counter() < stop:
                kind = "long" if rng.random() < args.long_share else "short"
                prompt = rng.choice(prompts)
                start = time.perf_counter()
                try:
                    state = remote.generate([VLMRequest(prompt)], [-1], kinds[kind])[0]
                except Exception as err:
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")
                    continue
                with lock:
                    latencies[kind].append(time.perf_counter() - start)
                    tokens[0] += len(state.output_token_ids)
                    ref = expected[(kind, prompt)]
                    same = state.output_token_ids.tolist() == ref.output_token_ids.tolist() and \
                        (state.output_embed[engine.num_layers] - ref.output_embed[engine.num_layers]).abs().max() \
                        <= 1e-4
                    if not same:
                        mismatches.append((kind, prompt))

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - start

    calls = sum(len(v) for v in latencies.values())
    print(f"tiny Llama ({args.backend}, {args.threads} threads), {args.clients} clients x {args.seconds:g} s, "
          f"{args.long_share:.0%} long calls ({args.long_tokens} tokens) among short ones ({args.short_tokens})")
    print(f"  calls answered      {calls} in {wall:.1f} s: {calls / wall:.2f} calls/s, {tokens[0] / wall:.0f} "
          "generated tokens/s")
    for kind, values in latencies.items():
        print(f"  {kind:5s} latency       p50 {percentile(values, 0.5):.3f} s, p99 {percentile(values, 0.99):.3f} s "
              f"({len(values)} calls)")
    print(f"  failures            {len(failures)}" + (f" (first: {failures[0]})" if failures else ""))
    print(f"  answers equal to in-process: {calls - len(mismatches)} of {calls}")
    short = statistics.median(alone)
    print(f"  short call alone {short:.3f} s; long call alone {long_alone:.3f} s; short call arriving while a long "
          f"one runs {behind_long:.3f} s = {behind_long / short:.1f}x its own time (goal <= 2x)")


if __name__ == "__main__":
    main()
