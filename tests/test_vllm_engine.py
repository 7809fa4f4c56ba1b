"""The vLLM engine against the transformers engine: same greedy tokens, states within 1e-4 (float32).

vLLM runs in a child process (this file run as a script) and writes its results; transformers runs here (vLLM's
Transformers backend patches transformers classes, after which an HF Mllama cannot be built). Cases: tiny Llama
with prefix caching (states recorded while generating); tiny Mllama
through our vLLM plugin with 1-3 images (image first, text before an image of 1, 2, 3 and 4 tiles, text between
images), text-only, all in one batch, at a self-attention layer (1) and after the cross-attention layer (2), which
runs without prefix caching (encoder-decoder); tiny Mllama text-only (prefix caching); seeded sampling, with states
for copies of one prompt (rows shared through the prefix cache); weights pushed from a transformers model into vLLM
(GRPO's sync).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TOL = 1e-4
LAYERS = [0, 1, 2, 4]


def image(width, height, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def cases():
    from thinkdiff.vlm import VLMRequest

    return {
        "llama": [VLMRequest("Describe a red apple."), VLMRequest("Tell me a story about a dog and a ball.")],
        "mllama": [
            VLMRequest("Describe the image concisely.", [image(70, 40, 1)]),  # 4 tiles, image first
            VLMRequest("Look at this picture: <image> Describe it.", [image(56, 28, 2)]),  # text before image
            VLMRequest("A cat <image> and a dog <image> which is bigger?", [image(90, 30, 3), image(28, 28, 4)]),
            VLMRequest("<image><image> Compare these. <image> Which one is odd?",
                       [image(28, 28, 5), image(56, 28, 6), image(30, 90, 7)]),
            VLMRequest("A text-only question about apples."),
        ] + [VLMRequest(f"Chat first, {n} tiles: <image> what is it?", [image(w, h, 10 + n)])  # text before image
             for n, (w, h) in enumerate([(28, 28), (56, 28), (30, 90), (70, 40)], 1)],
    }


def make_head16_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkdiff.testing.tiny_models import tiny_path

    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                                 intermediate_size=64, vocab_size=420)).save_pretrained(out)
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tiny_path("llama")) / name).exists():
            shutil.copy(Path(tiny_path("llama")) / name, out / name)


def serve_and_ask(engine, requests, sampling):
    """`thinkdiff serve` on this engine; a client sends the requests with images (base64) in one call, then 8
    clients send one request each at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    from thinkdiff.serve import HiddenStateServer
    from thinkdiff.vlm.remote_engine import RemoteEngine

    server = HiddenStateServer(engine, port=0)
    server.start()
    try:
        client = RemoteEngine(server.url)
        served = [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed)
                  for s in client.generate(requests, LAYERS, sampling)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(RemoteEngine(server.url).generate, [r], [], sampling) for r in requests[:8]]
            concurrent = [f.result(timeout=300)[0].output_token_ids for f in futures]
    finally:
        server.close()
    return served, concurrent


def shared_prefix_requests():
    """Three copies of one prompt (GRPO's group) and another prompt: the copies share KV blocks in vLLM."""
    from thinkdiff.vlm import VLMRequest

    return [VLMRequest("Tell me a story about a dog and a ball, then describe the house with a garden.")] * 3 + [
        VLMRequest("Describe a red apple on a wooden table.")]


EOS_ANSWER = 6  # max_new_tokens of the end-of-sequence case
SHARED_ANSWER = 8  # max_new_tokens of the shared-prefix case, which also fills the Llama engine's max_model_len


def stream_probe(engine, requests, greedy, sampled) -> dict:
    """Continuous batching (VLLMStream): a short call submitted while a long one decodes joins its batch and
    finishes first; a call of prompt copies sharing KV blocks; a cancelled call leaves the batch."""
    import time

    from thinkdiff.vlm import SamplingConfig
    from thinkdiff.vlm.vllm_stream import VLLMStream

    def tuples(states):
        return [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed) for s in states]

    room = engine.max_model_len - len(engine.prompt_ids(requests[0])) - 2
    long = SamplingConfig(max_new_tokens=min(40, room), min_new_tokens=min(40, room))
    stream = VLLMStream(engine)
    try:
        long_call = stream.submit(requests[:1], LAYERS, long)
        while stream.steps < 3:
            time.sleep(0.001)
        short_call = stream.submit(requests[1:], LAYERS, greedy)
        short = short_call.result(timeout=300)
        long_running_when_short_done = not long_call.done()
        out = {"long_tokens": long.max_new_tokens, "long": tuples(long_call.result(timeout=300)),
               "short": tuples(short), "long_running_when_short_done": long_running_when_short_done,
               "shared": tuples(stream.submit(shared_prefix_requests(), LAYERS,
                                              SamplingConfig(**{**vars(sampled), "seed": 5})).result(timeout=300))}
        gone = stream.submit(requests[:1], [], long)
        while stream.running == 0 and not gone.done():
            time.sleep(0.001)
        stream.cancel(gone)
        deadline = time.monotonic() + 60
        while stream.running and time.monotonic() < deadline:
            time.sleep(0.01)
        out["running_after_cancel"], out["cancelled_done"] = stream.running, gone.done()
        out["after"] = tuples(stream.submit(requests[:1], LAYERS, greedy).result(timeout=300))
    finally:
        stream.close()
    return out


def prompt_lengths(kind, requests) -> list[int]:
    from types import SimpleNamespace

    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm.transformers_engine import _load_processor
    from thinkdiff.vlm.vllm_engine import VLLMEngine

    processor = _load_processor(tiny_path(kind), "mllama" if kind == "mllama" else "text")
    tokenizer = SimpleNamespace(processor=processor, tokenizer=getattr(processor, "tokenizer", processor))
    return [len(VLLMEngine.prompt_ids(tokenizer, r)) for r in requests]


def make_eos_copy(engine, kind: str, out: Path) -> Path:
    """A copy of a tiny model whose generation config also ends answers at a token that greedy decoding produces
    third in one of cases()[kind]'s answers: that answer stops early, at end of sequence."""
    import shutil

    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import SamplingConfig

    answers = [s.output_token_ids.tolist()
               for s in engine.generate(cases()[kind], [], SamplingConfig(max_new_tokens=EOS_ANSWER))]
    stop = next(a[2] for a in answers if len(a) == EOS_ANSWER and a[2] not in a[:2])
    shutil.copytree(tiny_path(kind), out)
    config = json.loads((out / "generation_config.json").read_text())
    eos = config.get("eos_token_id")
    config["eos_token_id"] = ([eos] if isinstance(eos, int) else list(eos or [])) + [stop]
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


def counted(fn, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper


def run_child(out: str) -> None:
    """vLLM side: every case, one batch per model; then seeded sampling and a weight update."""
    from transformers import AutoModelForCausalLM

    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import SamplingConfig
    from thinkdiff.vlm.vllm_engine import VLLMEngine

    results = {}
    greedy = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    for kind, requests in cases().items():
        if kind == "mllama":
            engine = VLLMEngine(tiny_path(kind), max_images=3)
        else:  # shared_prefix_requests' copies fill max_model_len
            engine = VLLMEngine(tiny_path(kind), batch_size=8,
                                max_model_len=max(prompt_lengths(kind, shared_prefix_requests())) + SHARED_ANSWER)
        results[f"{kind}_prefix_caching"] = engine.prefix_caching
        results[f"{kind}_suppressed"] = [engine.sampling_params(SamplingConfig(do_sample=do_sample, seed=0), 0, False)
                                         .extra_args["thinkdiff"]["suppressed"] for do_sample in (True, False)]
        results[f"{kind}_missing_internals"] = engine.llm.collective_rpc("thinkdiff_missing_internals")[0]
        results[kind] = [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed)
                         for s in engine.generate(requests, LAYERS, greedy)]
        if kind == "llama":
            # Tokens the engine must never sample (vision tokens for a VLM): here the greedy answer's own tokens, so
            # a near-greedy sample (temperature 0.05) would hold them without the suppression.
            cold = SamplingConfig(max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=0.05, seed=1)
            results["cold"] = engine.generate(requests[:1], [], cold)[0].output_token_ids
            engine.vision_token_ids = sorted(set(results["llama"][0][1].tolist()))
            results["cold_suppressed"] = engine.generate(requests[:1], [], cold)[0].output_token_ids
            engine.vision_token_ids = []
            sampled = SamplingConfig(max_new_tokens=SHARED_ANSWER, do_sample=True, temperature=1.5)
            results["stream"] = stream_probe(engine, requests, greedy, sampled)
            runs = [engine.generate(requests[:1] * 2, [], SamplingConfig(**{**vars(sampled), "seed": s}))
                    for s in (3, 3, 4)]
            results["sampled"] = [[o.output_token_ids for o in run] for run in runs]
            copies = SamplingConfig(max_new_tokens=6, do_sample=True, seed=11)
            results["copies"] = [[o.output_token_ids.tolist() for o in engine.generate(requests[:1] * n, [], copies)]
                                 for n in (24, 5)]
            # Count vLLM's generate calls and the rows its model computes (the hooks' record of every step).
            calls, rows, rpc = [], [], engine.llm.collective_rpc
            engine.llm.generate = counted(engine.llm.generate, calls)

            def counting_rpc(method, *args, rpc=rpc, rows=rows, **kwargs):
                out = rpc(method, *args, **kwargs)
                if method == "thinkdiff_collect_hooks":
                    rows.append(int(sum(out[0]["counts"])))
                return out

            engine.llm.collective_rpc = counting_rpc
            results["shared"] = [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed)
                                 for s in engine.generate(shared_prefix_requests(), LAYERS,
                                                          SamplingConfig(**{**vars(sampled), "seed": 5}))]
            results["shared_vllm_calls"], results["shared_rows"] = len(calls), rows
            del engine.llm.generate, engine.llm.collective_rpc
            model = AutoModelForCausalLM.from_pretrained(tiny_path("llama"))
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.1)
            engine.update_weights(model.state_dict().items())
            results["updated"] = [s.output_token_ids for s in engine.generate(requests, [], greedy)]
            # A LoRA policy's merged weights (what GRPO pushes after each update): greedy answers and states.
            policy = lora_policy()
            engine.update_weights(policy.merged_weights())
            results["lora"] = [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed)
                               for s in engine.generate(requests, LAYERS, greedy)]
            try:
                engine.generate(requests, [9])
            except ValueError as err:
                results["layer_error"] = str(err)
        else:
            from thinkdiff.vlm import VLMRequest

            try:
                engine.generate([VLMRequest("four images", [image(28, 28, 0)] * 4)], [1])
            except ValueError as err:
                results["image_error"] = str(err)
            results["after_error"] = engine.generate(requests[:1], [], greedy)[0].output_token_ids
            results["served"], results["concurrent"] = serve_and_ask(engine, requests, greedy)
        del engine
        gc.collect()  # the closed server's event loop leaves the engine in reference cycles: the LLM must go now
    from thinkdiff.vlm import VLMRequest

    engine = VLLMEngine(tiny_path("mllama"), max_images=0)  # text-only Mllama: a decoder with prefix caching
    results["mllama_text_prefix_caching"] = engine.prefix_caching
    text_requests = [r for r in cases()["mllama"] if not r.images] + [VLMRequest("Describe a cat next to a car.")]
    results["mllama_text"] = [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed)
                              for s in engine.generate(text_requests, LAYERS, greedy)]
    try:
        engine.generate([VLMRequest("an image", [image(28, 28, 0)])], [1])
    except ValueError as err:
        results["text_only_image_error"] = str(err)
    del engine
    eos = SamplingConfig(max_new_tokens=EOS_ANSWER)  # answers that end at the copies' extra end-of-sequence token
    for kind, requests in cases().items():
        engine = VLLMEngine(Path(out).parent / f"eos-{kind}", max_images=3 if kind == "mllama" else None)
        calls = []
        engine.llm.generate = counted(engine.llm.generate, calls)
        results[f"eos_{kind}"] = [(s.prompt_token_ids, s.output_token_ids, s.input_embed, s.output_embed)
                                  for s in engine.generate(requests, LAYERS, eos)]
        results[f"eos_{kind}_vllm_calls"] = len(calls)
        del engine.llm.generate  # the wrapper holds the LLM: drop it, so the LLM goes before the next one starts
        del engine
    head16 = Path(out).parent / "head16"
    make_head16_llama(head16)
    try:
        VLLMEngine(head16)
    except ValueError as err:
        results["head_error"] = str(err)
    try:  # vLLM's own Qwen2-VL code imports torchvision, which this CPU install lacks on purpose
        VLLMEngine(tiny_path("qwen2-vl"))
        results["qwen2_vl"] = "loaded"
    except ImportError as err:
        results["qwen2_vl"] = str(err)
    results["eos_dirs"] = [str(Path(out).parent / f"eos-{kind}") for kind in cases()]
    torch.save(results, out)


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory, engine):
    out = tmp_path_factory.mktemp("vllm") / "results.pt"
    for kind in cases():
        make_eos_copy(engine(kind), kind, out.parent / f"eos-{kind}")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


@pytest.mark.parametrize("kind", ["llama", "mllama"])
def test_vllm_matches_transformers(vllm_results, engine, kind):
    from thinkdiff.vlm import SamplingConfig

    greedy = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    # One request at a time: left padding in a transformers batch can flip near-tied greedy choices.
    reference = [engine(kind).generate([r], LAYERS, greedy)[0] for r in cases()[kind]]
    assert len(reference) == len(vllm_results[kind])
    for ref, (prompt, output, input_embed, output_embed) in zip(reference, vllm_results[kind]):
        assert torch.equal(ref.prompt_token_ids, prompt)
        assert torch.equal(ref.output_token_ids, output)
        for layer in LAYERS:
            assert (ref.input_embed[layer] - input_embed[layer]).abs().max() <= TOL
            assert (ref.output_embed[layer] - output_embed[layer]).abs().max() <= TOL


def close_to(ref, prompt, output, input_embed, output_embed):
    assert torch.equal(ref.prompt_token_ids, prompt)
    assert torch.equal(ref.output_token_ids, output)
    for layer in LAYERS:
        assert input_embed[layer].shape == ref.input_embed[layer].shape
        assert output_embed[layer].shape == ref.output_embed[layer].shape
        assert input_embed[layer].dtype == torch.float32
        assert (ref.input_embed[layer] - input_embed[layer]).abs().max() <= TOL
        assert (ref.output_embed[layer] - output_embed[layer]).abs().max() <= TOL


def test_the_live_model_runner_has_every_attribute_the_hooks_read(vllm_results):
    assert vllm_results["llama_missing_internals"] == vllm_results["mllama_missing_internals"] == []


def test_states_recorded_while_generating_where_prefix_caching_is_on(vllm_results):
    """Text models record states while generating (prefix caching on); Mllama with images cannot (encoder-decoder
    in vLLM: no prefix caching) and states come from the prefill pass alone. Both paths are compared above."""
    assert vllm_results["llama_prefix_caching"] and vllm_results["mllama_text_prefix_caching"]
    assert not vllm_results["mllama_prefix_caching"]


def test_mllama_text_only_engine_matches_transformers(vllm_results, engine):
    from thinkdiff.vlm import SamplingConfig, VLMRequest

    greedy = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    requests = [r for r in cases()["mllama"] if not r.images] + [VLMRequest("Describe a cat next to a car.")]
    for request, got in zip(requests, vllm_results["mllama_text"], strict=True):
        close_to(engine("mllama").generate([request], LAYERS, greedy)[0], *got)
    assert "at most 0" in vllm_results["text_only_image_error"]


def test_sampled_copies_of_a_prompt_get_the_states_of_their_own_answers(vllm_results, engine):
    """Copies of one prompt share KV blocks, so vLLM computes their prompt rows once; each copy still gets the
    states of one forward pass over its prompt + its own sampled answer."""
    shared = vllm_results["shared"]
    assert len({tuple(output.tolist()) for _, output, _, _ in shared[:3]}) == 3  # three different answers
    # The copies filled max_model_len (prompt + SHARED_ANSWER): each keeps one token fewer, so vLLM computed its rows.
    assert [len(output) for _, output, _, _ in shared[:3]] == [SHARED_ANSWER - 1] * 3
    eng = engine("llama")
    # One vLLM call, no prefill pass after it; the model computed fewer rows than the sequences hold (the copies'
    # shared prompt blocks came from the prefix cache), and the states of every row are still there.
    assert vllm_results["shared_vllm_calls"] == 1
    held = sum(len(prompt) + len(output) for prompt, output, _, _ in shared)
    (computed,) = vllm_results["shared_rows"]
    assert computed < held - 32, (computed, held)  # at least one 32-token KV block of each extra copy was reused
    for request, (prompt, output, input_embed, output_embed) in zip(shared_prefix_requests(), shared, strict=True):
        assert torch.equal(prompt, torch.tensor(eng.tokenizer(eng.chat_text(request), add_special_tokens=False)
                                                ["input_ids"]))
        states = eng._states(request, prompt, output, LAYERS)
        p = len(prompt)
        for layer in LAYERS:
            assert (states[layer][:p] - input_embed[layer]).abs().max() <= TOL
            assert (states[layer][p:] - output_embed[layer]).abs().max() <= TOL
            assert output_embed[layer].shape == (len(output), eng.hidden_size)


@pytest.mark.parametrize("kind", ["llama", "mllama"])
def test_answers_ending_early_get_their_last_row(vllm_results, kind):
    """Answers that end at end of sequence run one step more (the end token as input, then a forced sentinel that
    stops them), so the end token's row is computed while generating; the others keep the rows of the extra token's
    step. Both equal the transformers reference."""
    from thinkdiff.vlm import SamplingConfig
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    got = vllm_results[f"eos_{kind}"]
    assert vllm_results[f"eos_{kind}_vllm_calls"] == 1  # no prefill pass after generating
    lengths = [len(output) for _, output, _, _ in got]
    assert min(lengths) < EOS_ANSWER and max(lengths) == EOS_ANSWER, lengths
    copy = next(Path(p) for p in vllm_results["eos_dirs"] if p.endswith(f"eos-{kind}"))
    reference = TransformersEngine(copy)
    for request, result in zip(cases()[kind], got, strict=True):
        close_to(reference.generate([request], LAYERS, SamplingConfig(max_new_tokens=EOS_ANSWER))[0], *result)


def test_continuous_batching_on_vllm(vllm_results, engine):
    """A short call arriving while a long one decodes joins the running batch and is answered first; every answer
    keeps the states of one forward pass over its prompt + answer (the short and shared calls equal what one
    `generate` call gives, the long one the transformers engine); a cancelled call leaves the batch."""
    from thinkdiff.vlm import SamplingConfig

    got = vllm_results["stream"]
    assert got["long_running_when_short_done"]
    eng, llama, n = engine("llama"), cases()["llama"], got["long_tokens"]
    six = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    close_to(eng.generate(llama[:1], LAYERS, SamplingConfig(max_new_tokens=n, min_new_tokens=n))[0], *got["long"][0])
    (short,) = got["short"]
    close_to(eng.generate(llama[1:], LAYERS, six)[0], *short)
    for (prompt, output, input_embed, output_embed), ref in zip(got["shared"], vllm_results["shared"], strict=True):
        # the same sampled answers as one generate call (a seed per request), the same states
        assert torch.equal(prompt, ref[0]) and torch.equal(output, ref[1])
        for layer in LAYERS:
            assert (input_embed[layer] - ref[2][layer]).abs().max() <= TOL
            assert (output_embed[layer] - ref[3][layer]).abs().max() <= TOL
    assert got["running_after_cancel"] == 0 and got["cancelled_done"]
    close_to(eng.generate(llama[:1], LAYERS, six)[0], *got["after"][0])


def test_served_vllm_matches_transformers(vllm_results, engine):
    """`thinkdiff serve --backend vllm` with images sent by a client, and 8 concurrent clients."""
    from thinkdiff.vlm import SamplingConfig

    greedy = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    reference = [engine("mllama").generate([r], LAYERS, greedy)[0] for r in cases()["mllama"]]
    for ref, (prompt, output, input_embed, output_embed) in zip(reference, vllm_results["served"]):
        assert torch.equal(ref.output_token_ids, output) and torch.equal(ref.prompt_token_ids, prompt)
        for layer in LAYERS:
            assert (ref.input_embed[layer] - input_embed[layer]).abs().max() <= TOL
            assert (ref.output_embed[layer] - output_embed[layer]).abs().max() <= TOL
    assert len(vllm_results["concurrent"]) == 8
    for ref, output in zip(reference, vllm_results["concurrent"]):
        assert torch.equal(ref.output_token_ids, output)


def test_sampled_copies_are_distinct_and_independent_of_the_call(vllm_results):
    """Request i samples with its own seed derived from (seed, i): 24 copies of a prompt give distinct answers, and
    a 5-copy call returns exactly the first 5 answers of the 24-copy call."""
    many, few = vllm_results["copies"]
    assert len(set(map(tuple, many))) >= 22, many
    assert few == many[:5]


def test_answer_end_masks_the_sentinel_and_suppressed_tokens():
    from thinkdiff.vlm.vllm_answer_end import AnswerEnd

    end = AnswerEnd([2], sentinel=0, force=True, suppressed=[5, 7])
    logits = end([1], torch.zeros(10))
    assert torch.isinf(logits).nonzero().flatten().tolist() == [0, 5, 7]
    forced = end([1, 2], torch.zeros(10))  # right after an end token: the sentinel only
    assert torch.isfinite(forced).nonzero().flatten().tolist() == [0]


def test_vllm_sampling_never_draws_suppressed_tokens(vllm_results, engine):
    """The vLLM engine suppresses its vision tokens when sampling (as the transformers engine does): with the greedy
    answer's tokens as the suppressed set, a near-greedy sample holds none of them, and holds them without it.
    Mllama's <|image|> lies past its LM head, so neither engine has a vision token to suppress for it."""
    greedy = vllm_results["llama"][0][1]
    assert vllm_results["cold"][:1].tolist() == greedy[:1].tolist()
    assert not set(vllm_results["cold_suppressed"].tolist()) & set(greedy.tolist())
    assert vllm_results["mllama_suppressed"] == [[], []] and engine("mllama").vision_token_ids == []


def test_seeded_sampling_reproduces(vllm_results):
    a, b, c = vllm_results["sampled"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # two samples of one prompt differ (per-request seeds)


def lora_policy():
    """A LoRA policy on the tiny Llama whose adapters are not the identity (B drawn from a fixed generator)."""
    from thinkdiff.grpo.policy import Policy
    from thinkdiff.testing.tiny_models import tiny_path

    policy = Policy(tiny_path("llama"), lora_rank=4, keep_reference=False, seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return policy


def test_lora_rollouts_equal_the_merged_model(vllm_results):
    """vLLM serving a LoRA policy's merged weights answers and returns states as transformers does on the
    policy merged by peft itself (merge_and_unload); the policy stays unmerged for training."""
    from thinkdiff.testing.tiny_models import tiny_path
    from thinkdiff.vlm import SamplingConfig
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    policy = lora_policy()
    request = cases()["llama"][0]
    inputs = policy.engine.forward_inputs(request, torch.tensor([5, 6]))
    before = policy.model(**inputs).logits
    names = [name for name, _ in policy.merged_weights()]
    # Unmerged again after handing out merged weights (W + BA - BA: float rounding only).
    torch.testing.assert_close(policy.model(**inputs).logits, before, atol=1e-4, rtol=1e-4)
    assert not any("lora_" in n or "base_layer" in n for n in names)
    merged = TransformersEngine(tiny_path("llama"), model=policy.model.merge_and_unload().eval())
    greedy = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    for request, (prompt, output, input_embed, output_embed) in zip(cases()["llama"], vllm_results["lora"],
                                                                    strict=True):
        ref = merged.generate([request], LAYERS, greedy)[0]
        assert torch.equal(ref.prompt_token_ids, prompt) and torch.equal(ref.output_token_ids, output)
        for layer in LAYERS:  # states ~10x larger than the base model's (|x| <= ~16): float noise up to ~2.5e-4
            torch.testing.assert_close(input_embed[layer], ref.input_embed[layer], atol=5e-4, rtol=0)
            torch.testing.assert_close(output_embed[layer], ref.output_embed[layer], atol=5e-4, rtol=0)
    assert [g[1].tolist() for g in vllm_results["lora"]] != [r[1].tolist() for r in vllm_results["llama"]]


def test_weight_update_reaches_vllm(vllm_results, tiny):
    from thinkdiff.vlm import SamplingConfig
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny("llama"))
    with torch.no_grad():
        for p in engine.model.parameters():
            p.mul_(1.1)
    reference = engine.generate(cases()["llama"], [], SamplingConfig(max_new_tokens=6, min_new_tokens=6))
    assert [r.output_token_ids.tolist() for r in reference] == [t.tolist() for t in vllm_results["updated"]]
    assert [t.tolist() for t in vllm_results["updated"]] != [r[1].tolist() for r in vllm_results["llama"]]


def test_bad_requests_get_clear_errors_and_the_engine_keeps_serving(vllm_results):
    assert "valid layers are 0..4" in vllm_results["layer_error"]
    assert "at most 3" in vllm_results["image_error"]
    assert torch.equal(vllm_results["after_error"], vllm_results["mllama"][0][1])


def test_cpu_head_size_limit_is_named(vllm_results):
    assert "head size is 16" in vllm_results["head_error"] and "32, 64, 80" in vllm_results["head_error"]


def test_qwen2_vl_without_torchvision_says_why(vllm_results):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here")  # never in this project's CI (CPU build without it)
    except ImportError:
        assert "needs torchvision" in vllm_results["qwen2_vl"]


if __name__ == "__main__":
    run_child(sys.argv[1])
