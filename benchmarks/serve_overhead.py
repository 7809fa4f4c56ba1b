"""Cost of serving hidden states over HTTP: the same 16 requests through the in-process engine and through
`python -m thinkdiff serve`'s server (`RemoteEngine` client), on the embedded tiny Llama.

    .venv/bin/python benchmarks/serve_overhead.py [--runs 5] [--requests 16] [--tokens 16] [--layers 0 2 4]

Three ways of sending the requests: one call with all 16 (in-process vs remote), and 16 callers with one
request each, sequential (in-process vs remote) and concurrent (remote; the server runs them one at a time, as
calls of one request each). The server runs in this process on a thread (loopback, port 0), so client-side JSON/PNG/
safetensors work and the server share the same cores. The tiny model makes the engine's own time small, so these
ratios are an upper bound on the HTTP overhead; with a real VLM the engine dominates.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor


def timed(fn, runs):
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (the best is reported)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens (min_new_tokens is the same)")
    parser.add_argument("--layers", type=int, nargs="*", default=[0, 2, 4])
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

    engine = TransformersEngine(tiny_path("llama"))
    requests = [VLMRequest(f"Describe picture {i}: a red apple {'on a wooden table ' * (i % 4)}in soft light.")
                for i in range(args.requests)]
    sampling = SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    with HiddenStateServer(engine, port=0, backend="transformers").start() as server:
        remote = RemoteEngine(server.url)
        local_out = engine.generate(requests, args.layers, sampling)
        remote_out = remote.generate(requests, args.layers, sampling)
        diff = max((r.output_embed[k] - s.output_embed[k]).abs().max().item()
                   for r, s in zip(remote_out, local_out) for k in s.output_embed) if args.layers else 0.0
        same_tokens = all(r.output_token_ids.tolist() == s.output_token_ids.tolist()
                          for r, s in zip(remote_out, local_out))

        def each(eng):
            return lambda: [eng.generate([r], args.layers, sampling) for r in requests]

        def concurrent():
            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                list(pool.map(lambda r: remote.generate([r], args.layers, sampling), requests))

        t_local = timed(lambda: engine.generate(requests, args.layers, sampling), args.runs)
        t_remote = timed(lambda: remote.generate(requests, args.layers, sampling), args.runs)
        t_local_each = timed(each(engine), args.runs)
        t_remote_each = timed(each(remote), args.runs)
        t_remote_conc = timed(concurrent, args.runs)

    n_states = sum(t.numel() for s in local_out for d in (s.input_embed, s.output_embed) for t in d.values())
    print(f"serve overhead, tiny llama, {args.requests} requests x {args.tokens} tokens, layers {args.layers} "
          f"({n_states * 4 / 2**20:.2f} MiB of float32 states per call), best of {args.runs}:")
    print(f"  remote == in-process: tokens {'equal' if same_tokens else 'DIFFER'}, states max abs diff {diff:.1e}")
    print(f"  {'one call, %d requests:' % args.requests:27s} in-process {t_local * 1e3:8.1f} ms   remote "
          f"{t_remote * 1e3:8.1f} ms   ratio {t_remote / t_local:5.2f}")
    print(f"  {'%d sequential calls:' % args.requests:27s} in-process {t_local_each * 1e3:8.1f} ms   remote "
          f"{t_remote_each * 1e3:8.1f} ms   ratio {t_remote_each / t_local_each:5.2f}")
    print(f"  {'%d concurrent calls:' % args.requests:27s} remote {t_remote_conc * 1e3:8.1f} ms   ratio to "
          f"{args.requests} sequential in-process calls {t_remote_conc / t_local_each:5.2f}")


if __name__ == "__main__":
    main()
