"""The transformers engine's states equal a plain transformers forward pass over prompt + generated tokens."""

import pytest
import torch

from thinkdiff.vlm import SamplingConfig, VLMRequest

from .conftest import make_image

TOL = 1e-5


def reference_states(engine, request, output_ids):
    """hidden_states of one plain forward pass (output_hidden_states=True) over prompt + generated tokens."""
    text = engine.processor.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
    kwargs = dict(return_tensors="pt", add_special_tokens=False)
    if engine.family == "text":
        enc = engine.processor([text], **kwargs)
    elif engine.family == "mllama":
        enc = engine.processor(text=[text], images=[request.images], **kwargs)
    else:
        enc = engine.processor(text=[text], images=request.images, **kwargs)
    prompt_ids = enc["input_ids"][0].clone()
    g = len(output_ids)
    enc["input_ids"] = torch.cat([enc["input_ids"], output_ids[None]], 1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    if "cross_attention_mask" in enc:
        m = enc["cross_attention_mask"]
        enc["cross_attention_mask"] = torch.cat([m, m[:, -1:].repeat(1, g, 1, 1)], 1)
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, g, dtype=torch.long)], 1)
    with torch.no_grad():
        out = engine.model(**enc, output_hidden_states=True)
    return prompt_ids, [h[0] for h in out.hidden_states]


CASES = {
    "mllama": lambda: VLMRequest("Describe the image concisely.", [make_image(70, 40)]),
    "qwen2-vl": lambda: VLMRequest("Describe the image concisely.", [make_image(70, 40)]),
    "llama": lambda: VLMRequest("Describe a red apple in a few words."),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_states_equal_plain_forward(engine, kind):
    eng = engine(kind)
    request = CASES[kind]()
    n = eng.num_layers
    layers = [0, n // 2, n]  # first, middle, last (final-normed)
    hs = eng.generate([request], layers, SamplingConfig(max_new_tokens=6, min_new_tokens=6))[0]
    prompt_ids, ref = reference_states(eng, request, hs.output_token_ids)
    assert len(ref) == n + 1
    assert torch.equal(hs.prompt_token_ids, prompt_ids)
    p, g = len(prompt_ids), len(hs.output_token_ids)
    assert g == 6
    for layer in layers:
        assert hs.input_embed[layer].shape == (p, eng.hidden_size)
        assert hs.output_embed[layer].shape == (g, eng.hidden_size)
        assert hs.input_embed[layer].dtype == torch.float32
        assert (hs.input_embed[layer] - ref[layer][:p]).abs().max() <= TOL
        assert (hs.output_embed[layer] - ref[layer][p:]).abs().max() <= TOL


def test_greedy_tokens_are_the_models_argmax(engine):
    """output_embed[j] sits where generated token j is the input: the final state at row j-1 predicts token j."""
    eng = engine("mllama")
    hs = eng.generate([CASES["mllama"]()], [-1], SamplingConfig(max_new_tokens=5, min_new_tokens=5))[0]
    final = torch.cat([hs.input_embed[eng.num_layers][-1:], hs.output_embed[eng.num_layers][:-1]])
    logits = eng.model.lm_head(final)
    assert torch.equal(logits.argmax(-1), hs.output_token_ids)


def test_batch_mixes_images_and_text_and_keeps_order(engine):
    eng = engine("mllama")
    requests = [VLMRequest("first <image> then", [make_image(30, 30, 1)]), VLMRequest("text only request"),
                VLMRequest("two <image> and <image> now", [make_image(50, 20, 2), make_image(20, 50, 3)])]
    batch = eng.generate(requests, [1], SamplingConfig(max_new_tokens=4))
    single = [eng.generate([r], [1], SamplingConfig(max_new_tokens=4))[0] for r in requests]
    for b, s in zip(batch, single):
        assert torch.equal(b.prompt_token_ids, s.prompt_token_ids)
    image_token = eng.tokenizer.convert_tokens_to_ids("<|image|>")
    assert [int((b.prompt_token_ids == image_token).sum()) for b in batch] == [1, 0, 2]


@pytest.mark.parametrize("kind", ["llama", "mllama"])
def test_repeated_prompts_encode_as_the_processor_does(engine, kind):
    """`encode` renders and tokenises each distinct text once (a GRPO group repeats a prompt K times): the batch
    equals the processor's own output for every row's text, padding and masks included."""
    eng = engine(kind)
    a, b = VLMRequest("Two plus two"), VLMRequest("What is the sum of these two digits? Answer in words.")
    system = VLMRequest("Two plus two", system="Be brief.")
    requests = [a, b, a, system, b, a]
    texts = [eng.chat_text(r) for r in requests]  # one rendering per row
    kwargs = dict(padding=True, return_tensors="pt", add_special_tokens=False)
    want = eng.processor(texts, **kwargs) if eng.family == "text" else eng.processor(text=texts, **kwargs)
    got = eng.encode(requests)
    assert sorted(got.keys()) == sorted(want.keys())
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_skipped_cross_attention_layer_is_identity(engine):
    """Text-only Mllama skips cross-attention layer 1 (0-based), so layer 2's state equals layer 1's."""
    eng = engine("mllama")
    assert eng.model.config.text_config.cross_attention_layers == [1]
    hs = eng.generate([VLMRequest("no image here")], [1, 2, 3], SamplingConfig(max_new_tokens=3))[0]
    assert torch.equal(hs.input_embed[1], hs.input_embed[2])
    assert not torch.equal(hs.input_embed[2], hs.input_embed[3])


def test_image_markers_place_images(engine):
    eng = engine("qwen2-vl")
    text = eng.chat_text(VLMRequest("Word 1: red, <image> Word 2: blue, <image>", [make_image(56, 56)] * 2))
    assert text.index("Word 1") < text.index("<|image_pad|>") < text.index("Word 2")
    assert text.count("<|image_pad|>") == 2
    first = eng.chat_text(VLMRequest("caption", [make_image(56, 56)]))
    assert first.index("<|image_pad|>") < first.index("caption")


def test_sampling_reproduces_with_seed(engine):
    eng = engine("llama")
    request = [VLMRequest("Tell me a story")]
    cfg = lambda seed: SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=seed)
    a, b = (eng.generate(request, [1], cfg(7))[0] for _ in range(2))
    c = eng.generate(request, [1], cfg(8))[0]
    assert torch.equal(a.output_token_ids, b.output_token_ids)
    assert not torch.equal(a.output_token_ids, c.output_token_ids)


def test_negative_layers_and_errors(engine, image):
    eng = engine("llama")
    assert eng.resolve_layers([-1, 0, -5, 4]) == [4, 0]
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.4"):
        eng.generate([VLMRequest("hi")], [5])
    with pytest.raises(ValueError, match="at most 0"):
        eng.generate([VLMRequest("hi", [image])], [1])
    with pytest.raises(ValueError, match="empty"):
        VLMRequest("   ")
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        VLMRequest("a <image> b <image>", [image])
