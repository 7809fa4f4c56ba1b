"""Mllama with images on vLLM 0.32's V1 engine (thinkdiff.vlm.vllm_mllama) against transformers.

transformers' reference runs here; vLLM runs in a child process (this file run as a script), because vLLM changes
process-wide state (threads, logging, and with its Transformers backend, transformers' Mllama classes).
Every case is greedy, 8 tokens, `ignore_eos`; tokens must be equal and the log-probs vLLM returns (top 5 and the
chosen token, per step) must match transformers' log-softmax within 1e-4. vLLM serves all cases in one batch, again
in reverse order (with the encoder outputs handed to the model reversed: they must be matched by their prompt), and
once more with staggered arrivals (new prompts with images join steps that decode others). A second engine with a
tiny KV cache generates 40 tokens for six cases, so requests get preempted and prefilled again. A third engine
serves the text-only case without the encoder-decoder override (limit_mm_per_prompt={"image": 0}).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MAX_NEW_TOKENS = 8
TOP_LOGPROBS = 5
TOLERANCE = 1e-4
IMAGE_LIMIT = 3
# Served by a second engine whose KV cache is too small for all of them (prompt + 40 tokens each).
PREEMPT_CASES = ["image_first_2_tiles", "chat_text_before_image", "two_images_text_between",
                 "three_images_text_between", "three_images_group_then_one", "text_only"]
PREEMPT_NEW_TOKENS = 40

# name -> (prompt, images as (width, height, seed)). A prompt is a string given to the processor as is, or a list
# of chat content parts put through the chat template. Tiles are 28x28, at most 4 per image.
CASES = {
    "image_first_1_tile": ("<|image|>What is in this image?", [(28, 28, 1)]),
    "image_first_2_tiles": ("<|image|>What is in this image?", [(56, 28, 2)]),
    "image_first_3_tiles": ("<|image|>What is in this image?", [(30, 90, 3)]),
    "image_first_4_tiles": ("<|image|>What is in this image?", [(70, 40, 4)]),
    "chat_text_before_image": ([{"type": "text", "text": "Look at this picture: "}, {"type": "image"},
                                {"type": "text", "text": "Describe it."}], [(56, 28, 5)]),
    "two_images_first": ("<|image|><|image|>What is in these images?", [(28, 28, 6), (30, 90, 7)]),
    "two_images_text_between": ("<|begin_of_text|>Look at this:<|image|>A cat.<|image|>B dog?",
                                [(90, 30, 8), (56, 28, 9)]),
    "three_images_text_between": ("<|image|>One<|image|>Two<|image|>Three, describe.",
                                  [(28, 56, 10), (28, 28, 11), (70, 40, 12)]),
    "three_images_group_then_one": ("<|image|><|image|>Compare these.<|image|>Which one is odd?",
                                    [(28, 28, 13), (56, 28, 14), (30, 90, 15)]),
    "text_only": ("<|begin_of_text|>Hello there, what is", []),
}
EXPECTED_TILES = {"image_first_1_tile": [1], "image_first_2_tiles": [2], "image_first_3_tiles": [3],
                  "image_first_4_tiles": [4], "chat_text_before_image": [2], "two_images_first": [1, 3],
                  "two_images_text_between": [3, 2], "three_images_text_between": [2, 1, 4],
                  "three_images_group_then_one": [1, 2, 3], "text_only": []}


def make_image(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


pytestmark = pytest.mark.skipif(not _vllm_available(), reason="vLLM is not installed")


# ------------------------------------------------------------------------------------------ reference


def transformers_reference(model_path: str, names=tuple(CASES), max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Prompt ids, tiles, greedy tokens and per-step log-softmax rows from transformers, one request at a time."""
    import torch
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_path)
    model = MllamaForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    out = {}
    for name in names:
        prompt, image_specs = CASES[name]
        if isinstance(prompt, list):
            prompt = processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        images = [make_image(*spec) for spec in image_specs]
        kwargs = dict(text=prompt, return_tensors="pt", add_special_tokens=False)
        enc = processor(images=[images], **kwargs) if images else processor(**kwargs)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 output_logits=True, return_dict_in_generate=True)
        prompt_len = enc["input_ids"].shape[1]
        out[name] = {
            "prompt_token_ids": enc["input_ids"][0].tolist(),
            "images": image_specs,
            "tiles": enc["aspect_ratio_mask"][0].sum(-1).tolist() if images else [],
            "tokens": gen.sequences[0, prompt_len:].tolist(),
            "logprobs": [torch.log_softmax(step[0].float(), -1).tolist() for step in gen.logits],
        }
    return out


# ------------------------------------------------------------------------------------------- vLLM child


def run_vllm_child(model_path: str, spec_path: str, out_path: str) -> None:
    """Serve the cases (one batch, reversed, staggered), two invalid requests, the preemption run and the text-only
    engine; write JSON."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from thinkdiff.vlm import vllm_mllama
    from thinkdiff.vlm.vllm_plugin import register

    assert register()
    # Encoder outputs are matched to requests by the prompt their item carries, not by order: in the "reversed"
    # run, hand them to the model in the opposite order of the scheduler's.
    forward, flip = vllm_mllama.MllamaForConditionalGeneration.forward, {"on": False}

    def forward_flipped(self, *args, encoder_outputs=None, **kwargs):
        if flip["on"] and encoder_outputs:
            encoder_outputs = encoder_outputs[::-1]
        return forward(self, *args, encoder_outputs=encoder_outputs, **kwargs)

    vllm_mllama.MllamaForConditionalGeneration.forward = forward_flipped
    spec = json.loads(Path(spec_path).read_text())
    cases = spec["cases"]
    llm = LLM(model_path, hf_overrides={"is_encoder_decoder": True}, enforce_eager=True, dtype="float32",
              limit_mm_per_prompt={"image": IMAGE_LIMIT}, max_model_len=256, max_num_seqs=16, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)

    def request(case):
        prompt = {"prompt_token_ids": case["prompt_token_ids"]}
        if case["images"]:
            prompt["multi_modal_data"] = {"image": [make_image(*spec) for spec in case["images"]]}
        return prompt

    def summary(output):
        return {"tokens": list(output.outputs[0].token_ids),
                "logprobs": [{str(tok): lp.logprob for tok, lp in step.items()} for step in output.outputs[0].logprobs]}

    def generate(names):  # uses the current `llm`, `cases` and `params`
        outputs = llm.generate([request(cases[n]) for n in names], params, use_tqdm=False)
        return {n: summary(o) for n, o in zip(names, outputs)}

    def staggered(names, arrival_steps):
        """Requests join a running batch: prefill steps mix with decode rows of others, finished slots get reused."""
        engine, done, step = llm.llm_engine, {}, 0
        while len(done) < len(names):
            for n, arrival in zip(names, arrival_steps):
                if arrival == step:
                    engine.add_request(n, request(cases[n]), params)
            done.update({o.request_id: summary(o) for o in engine.step() if o.finished})
            step += 1
        return done

    names = list(cases)
    result = {"batch": generate(names), "errors": {}}
    flip["on"] = True
    result["reversed"] = generate(names[::-1])
    flip["on"] = False
    result["staggered"] = staggered(names, [0, 1, 2, 2, 4, 5, 5, 7, 9, 9])
    result["text_only_alone"] = generate(["text_only"])
    image_first = cases["image_first_1_tile"]
    invalid = {
        "too_many_images": {"prompt_token_ids": image_first["prompt_token_ids"][:1] * (IMAGE_LIMIT + 1)
                            + image_first["prompt_token_ids"][1:],
                            "multi_modal_data": {"image": [make_image(28, 28, i) for i in range(IMAGE_LIMIT + 1)]}},
        "image_token_mismatch": {"prompt_token_ids": image_first["prompt_token_ids"],
                                 "multi_modal_data": {"image": [make_image(28, 28, 0), make_image(28, 28, 1)]}},
    }
    for name, prompt in invalid.items():
        try:
            llm.generate([prompt], params, use_tqdm=False)
            result["errors"][name] = None
        except Exception as err:  # noqa: BLE001 - reported to the test
            result["errors"][name] = {"type": type(err).__name__, "value_error": isinstance(err, ValueError),
                                      "message": str(err)}
    result["after_errors"] = generate(["image_first_4_tiles"])

    # Preemption: 24 blocks of 32 tokens cannot hold six growing requests, so some are preempted and later
    # prefilled again over prompt + generated tokens (their images are encoded again).
    del llm
    gc.collect()
    extend_rows, reprefills = vllm_mllama.MllamaForConditionalGeneration._extend_rows, []

    def extend_rows_counted(spec, num_rows):
        if num_rows > len(spec.prompt):
            reprefills.append(num_rows - len(spec.prompt))
        return extend_rows(spec, num_rows)

    vllm_mllama.MllamaForConditionalGeneration._extend_rows = staticmethod(extend_rows_counted)
    llm = LLM(model_path, hf_overrides={"is_encoder_decoder": True}, enforce_eager=True, dtype="float32",
              limit_mm_per_prompt={"image": IMAGE_LIMIT}, max_model_len=128, max_num_batched_tokens=128,
              block_size=32, num_gpu_blocks_override=24, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=PREEMPT_NEW_TOKENS, ignore_eos=True,
                            logprobs=TOP_LOGPROBS)
    cases = spec["preempt"]
    result["preempted"] = generate(list(cases))
    result["reprefills"] = reprefills

    # Text only, without the encoder-decoder override: a plain decoder that skips the cross-attention layers.
    del llm
    gc.collect()
    llm = LLM(model_path, enforce_eager=True, dtype="float32", limit_mm_per_prompt={"image": 0}, max_model_len=256,
              seed=0)
    cases, params = spec["cases"], SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                                                  logprobs=TOP_LOGPROBS)
    result["text_decoder"] = generate(["text_only"])
    Path(out_path).write_text(json.dumps(result))


# -------------------------------------------------------------------------------------------------- test


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # The tiny Mllama with 28-px tiles of 14-px patches (5 vision tokens a tile): these cases and the 24-block
    # preemption run are sized for it. The default 560-px tiles run in test_vllm_engine.
    from thinkdiff.testing.tiny_models import make_tiny

    model_path = str(make_tiny(tmp_path_factory.mktemp("tiles28") / "mllama", "mllama", tile=28, patch=14))
    reference = transformers_reference(model_path)
    preempt_reference = transformers_reference(model_path, PREEMPT_CASES, PREEMPT_NEW_TOKENS)
    work = tmp_path_factory.mktemp("vllm_mllama")
    spec, out = work / "cases.json", work / "vllm.json"
    spec.write_text(json.dumps({"cases": reference, "preempt": preempt_reference}))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH")] if p))
    proc = subprocess.run([sys.executable, __file__, model_path, str(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"vLLM child failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return reference, preempt_reference, json.loads(out.read_text())


def _compare(name, ref, got):
    assert got["tokens"] == ref["tokens"], f"{name}: vLLM {got['tokens']} != transformers {ref['tokens']}"
    assert len(got["logprobs"]) == len(ref["tokens"])
    worst = 0.0
    for step, (row, lps) in enumerate(zip(ref["logprobs"], got["logprobs"])):
        assert str(ref["tokens"][step]) in lps
        for tok, lp in lps.items():
            worst = max(worst, abs(lp - row[int(tok)]))
    assert worst <= TOLERANCE, f"{name}: max |logprob difference| {worst:.3g} > {TOLERANCE}"
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_matches_transformers(results, name):
    reference, _, got = results
    ref = reference[name]
    assert ref["tiles"] == EXPECTED_TILES[name]
    for mode in ("batch", "reversed", "staggered"):
        _compare(f"{name} ({mode})", ref, got[mode][name])
    if name == "text_only":  # a batch without any image; a text-only engine (no encoder-decoder override)
        _compare(f"{name} (alone)", ref, got["text_only_alone"][name])
        _compare(f"{name} (text-only engine)", ref, got["text_decoder"][name])


def test_preempted_requests_match_transformers(results):
    _, reference, got = results
    assert got["reprefills"], "no request was preempted and prefilled again; the test needs a smaller KV cache"
    for name in PREEMPT_CASES:
        _compare(f"{name} (preempted run)", reference[name], got["preempted"][name])


def test_invalid_requests_raise_value_error(results):
    reference, _, got = results
    too_many = got["errors"]["too_many_images"]
    assert too_many is not None and too_many["value_error"], too_many
    assert f"at most {IMAGE_LIMIT}" in too_many["message"]
    mismatch = got["errors"]["image_token_mismatch"]
    assert mismatch is not None and mismatch["value_error"], mismatch
    assert "1 <|image|> tokens but 2 images" in mismatch["message"]
    # The engine keeps serving after rejecting them.
    _compare("after_errors", reference["image_first_4_tiles"], got["after_errors"]["image_first_4_tiles"])


if __name__ == "__main__":
    run_vllm_child(*sys.argv[1:4])
