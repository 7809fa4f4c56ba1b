"""Sampling draws request i from its own generator keyed by (seed, i); library code leaves torch's global RNG alone."""

import torch

from thinkdiff.vlm import SamplingConfig, VLMRequest

PROMPT = "Create an image of a red apple on a wooden table in soft morning light."


def answers(engine, n, seed=11):
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.0, seed=seed)
    return [s.output_token_ids.tolist() for s in engine.generate([VLMRequest(PROMPT)] * n, [], sampling)]


def test_copies_of_a_prompt_are_distinct_and_independent_of_the_call(engine):
    llama = engine("llama")
    many = answers(llama, 24)
    assert len(set(map(tuple, many))) >= 22, many  # chunks of 8 used to repeat each other (8 distinct of 16)
    assert answers(llama, 5) == many[:5]
    batch_size = llama.batch_size
    try:
        llama.batch_size = 3  # other chunking, same answers
        assert answers(llama, 24) == many
    finally:
        llama.batch_size = batch_size
    assert answers(llama, 5, seed=12) != many[:5]


def test_sampling_with_images_is_per_request_too(engine, image):
    mllama = engine("mllama")
    sampling = SamplingConfig(max_new_tokens=6, do_sample=True, seed=3)
    requests = [VLMRequest("Describe the image.", [image])] * 6 + [VLMRequest("A text-only question.")] * 2
    both = [s.output_token_ids.tolist() for s in mllama.generate(requests, [], sampling)]
    alone = [s.output_token_ids.tolist() for s in mllama.generate(requests[:6], [], sampling)]
    assert both[:6] == alone and len(set(map(tuple, alone))) >= 5


def test_pipeline_leaves_the_global_rng_alone(tmp_path):
    from thinkdiff.pipeline import ThinkDiffPipeline

    before = torch.get_rng_state()
    pipe = ThinkDiffPipeline.from_config("configs/tiny.yaml", ["vlm.do_sample=true", "vlm.max_new_tokens=4",
                                                               "vlm.min_new_tokens=0"])
    pipe("Draw a cat.", seed=1, num_inference_steps=2, height=64, width=64, progress=False)
    assert torch.equal(before, torch.get_rng_state())
    again = ThinkDiffPipeline.from_config("configs/tiny.yaml")  # the same random aligner from aligner.seed
    assert all(torch.equal(a, b) for a, b in zip(pipe.aligner.state_dict().values(),
                                                  again.aligner.state_dict().values()))


def test_library_code_never_seeds_the_global_rng():
    """Model builders (test models, the miniature's fresh models) seed torch's global RNG only on the line right
    after entering fork_rng (transformers and diffusers initialise from it), which restores the caller's state."""
    from pathlib import Path

    import thinkdiff

    seeded = [(path.name, lines[n - 1]) for path in Path(thinkdiff.__file__).parent.rglob("*.py")
              for lines in [path.read_text().splitlines()] for n, line in enumerate(lines)
              if "torch.manual_seed(" in line or "torch.cuda.manual_seed" in line or "np.random.seed(" in line]
    assert {name for name, _ in seeded} == {"tiny_models.py", "t5.py", "decoder.py", "vlm.py", "judge.py",
                                            "base_policy.py"}, seeded
    assert all("fork_rng" in previous for _, previous in seeded), seeded
    before = torch.get_rng_state()
    import tempfile

    from thinkdiff.testing.tiny_models import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp + "/t5", "t5")
    assert torch.equal(before, torch.get_rng_state())


def test_per_request_sampler_draws_each_row_from_its_own_distribution():
    """Inverse-CDF sampling: frequencies match softmax(logits / T) after top-p, zero-probability tokens never come,
    and a row's token depends on its own generator only (not on the other rows of the batch)."""
    from thinkdiff.vlm.transformers_engine import PerRequestSampler

    probs = torch.tensor([0.1, 0.0, 0.3, 0.6])
    logits = probs.clamp_min(1e-30).log()[None]
    n = 20_000
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    chosen = PerRequestSampler(generators)(None, logits.repeat(n, 1)).argmax(-1)
    freq = torch.bincount(chosen, minlength=4) / n
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities; top-p 0.5 then keeps only the largest (0.6^2 / 0.46 = 0.78)
    chosen = PerRequestSampler(generators[:2000], temperature=0.5, top_p=0.5)(
        torch.zeros(2000, 1, dtype=torch.long), logits.repeat(2000, 1)).argmax(-1)
    assert set(chosen.tolist()) == {3}
    sharp = PerRequestSampler([torch.Generator().manual_seed(i) for i in range(n)], temperature=0.5)(
        None, logits.repeat(n, 1)).argmax(-1)
    torch.testing.assert_close(torch.bincount(sharp, minlength=4) / n, probs**2 / (probs**2).sum(), atol=0.015, rtol=0)
    alone = PerRequestSampler([torch.Generator().manual_seed(7)])(None, logits).argmax(-1)
    batched = PerRequestSampler([torch.Generator().manual_seed(3), torch.Generator().manual_seed(7)])(
        None, logits.repeat(2, 1)).argmax(-1)
    assert alone.item() == batched[1].item()


def test_per_request_sampler_uses_each_generators_stream_in_order():
    """Step t of row r takes the t-th uniform draw of r's generator, whatever the block of draws taken at once: the
    tokens equal an inverse-CDF lookup with one torch.rand(1) per row and step."""
    from thinkdiff.vlm.transformers_engine import PerRequestSampler

    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    cdf = torch.softmax(logits, -1).cumsum(-1)
    reference_gens = [torch.Generator().manual_seed(10 + r) for r in range(3)]
    want = [[int(torch.searchsorted(cdf[r], torch.rand(1, generator=g) * cdf[r, -1], right=True).clamp_max(5))
             for r, g in enumerate(reference_gens)] for _ in range(7)]
    for block in (1, 3, 16):
        sampler = PerRequestSampler([torch.Generator().manual_seed(10 + r) for r in range(3)], block=block)
        got = [sampler(None, logits).argmax(-1).tolist() for _ in range(7)]
        assert got == want, block


def test_sampling_never_draws_image_placeholders(engine):
    """A sampled Qwen2-VL answer holding <|image_pad|> (or a vision delimiter) cannot be fed back to the model (GRPO's
    update does that); near-uniform sampling over the tiny 420-token vocabulary would draw one of the four ~5 times
    in 512 tokens."""
    qwen = engine("qwen2-vl")
    vision = set(qwen.vision_token_ids)
    assert vision == {3, 4, 5, 6}  # image, video, vision start and end of the tiny Qwen2-VL
    sampling = SamplingConfig(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=5.0, seed=0)
    drawn = [t for s in qwen.generate([VLMRequest(PROMPT)] * 32, [], sampling) for t in s.output_token_ids.tolist()]
    assert len(drawn) == 512 and not vision & set(drawn)
