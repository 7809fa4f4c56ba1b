"""Each adapter's images are bit-identical to a direct diffusers pipeline call with the same tensors and seed."""

import numpy as np
import pytest
import torch

from thinkdiff.decoders import DECODERS

WIDTHS = {"flux": (4096, 768), "sd3": (4096, 2048), "sd15": (768, None), "sana": (2304, None),
          "qwenimage": (3584, None)}

_CACHE = {}


@pytest.fixture
def decoder(tiny):
    def get(family):
        if family not in _CACHE:
            _CACHE[family] = DECODERS[family].from_pretrained(tiny(family))
        return _CACHE[family]
    return get


def direct_call(pipe, seed, **kwargs):
    """The plain diffusers call a user would write."""
    return pipe(height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="pil", **kwargs).images


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("family", list(DECODERS))
def test_real_conditioning_widths(decoder, family):
    dec = decoder(family)
    assert (dec.conditioning_dim, dec.pooled_dim) == WIDTHS[family]
    for name in dec.text_components:
        assert getattr(dec.pipe, name, None) is None


def direct_kwargs(dec, family, tokens):
    """The conditioning keyword arguments a user would pass to the family's diffusers pipeline."""
    batch, length = tokens.shape[:2]
    kwargs = {"prompt_embeds": tokens}
    pooled = None if dec.pooled_dim is None else torch.zeros(batch, dec.pooled_dim)
    mask = torch.ones(batch, length, dtype=torch.long)
    negatives = torch.zeros_like(tokens)
    guidance = dec.default_guidance_scale
    if family == "flux":
        kwargs.update(pooled_prompt_embeds=pooled, guidance_scale=guidance)
    elif family == "sd3":
        kwargs.update(pooled_prompt_embeds=pooled, guidance_scale=guidance, negative_prompt_embeds=negatives,
                      negative_pooled_prompt_embeds=torch.zeros_like(pooled))
    elif family == "sd15":
        kwargs.update(guidance_scale=guidance, negative_prompt_embeds=negatives)
    elif family == "sana":
        kwargs.update(prompt_attention_mask=mask, guidance_scale=guidance, use_resolution_binning=False,
                      negative_prompt=None, negative_prompt_embeds=negatives, negative_prompt_attention_mask=mask)
    elif family == "qwenimage":
        kwargs.update(prompt_embeds_mask=mask, true_cfg_scale=guidance, negative_prompt_embeds=negatives,
                      negative_prompt_embeds_mask=mask)
    return kwargs


@pytest.mark.parametrize("family", list(DECODERS))
def test_adapter_equals_direct_pipeline_call(decoder, family):
    dec = decoder(family)
    tokens = torch.randn(2, 7, dec.conditioning_dim, generator=torch.Generator().manual_seed(0))
    cond = dec.make_conditioning(tokens)
    images = dec.generate(cond, height=64, width=64, num_inference_steps=2, seed=3, progress=False)
    assert len(images) == 2 and images[0].size == (64, 64)
    assert same(images, direct_call(dec.pipe, 3, **direct_kwargs(dec, family, tokens)))
    # The conditioning matters and the seed matters.
    assert not same(images, dec.generate(dec.make_conditioning(torch.randn_like(tokens)), height=64, width=64,
                                         num_inference_steps=2, seed=3, progress=False))
    assert not same(images, dec.generate(cond, height=64, width=64, num_inference_steps=2, seed=4, progress=False))


@pytest.mark.parametrize("family", list(DECODERS))
def test_num_images_per_prompt_equals_diffusers(decoder, family):
    """Prompts x 3 images: the same images, in the same order, as diffusers' own num_images_per_prompt. diffusers'
    FLUX and SD3 pipelines do not repeat given (pooled) embeddings: SD3 fails with a shape error, FLUX with 2
    prompts too (1 prompt broadcasts). For them the reference is the call a user must write instead: every
    embedding repeated 3 times."""
    dec = decoder(family)
    for batch in (1, 2):
        tokens = torch.randn(batch, 5, dec.conditioning_dim, generator=torch.Generator().manual_seed(batch))
        images = dec.generate(dec.make_conditioning(tokens), num_images_per_prompt=3, height=64, width=64,
                              num_inference_steps=2, seed=5, progress=False)
        if family in ("flux", "sd3"):
            repeated = {k: v.repeat_interleave(3, dim=0) if isinstance(v, torch.Tensor) else v
                        for k, v in direct_kwargs(dec, family, tokens).items()}
            direct = direct_call(dec.pipe, 5, **repeated)
        else:
            direct = direct_call(dec.pipe, 5, num_images_per_prompt=3, **direct_kwargs(dec, family, tokens))
        assert len(images) == 3 * batch and same(images, direct), (family, batch)
    assert not same(images[:3], images[3:])  # the two prompts' images differ


def test_shape_errors_name_expected_widths(decoder):
    flux, sana, sd15 = decoder("flux"), decoder("sana"), decoder("sd15")
    with pytest.raises(ValueError, match=r"\[B, L, 4096\], got \(1, 4, 768\)"):
        flux.generate(flux.make_conditioning(torch.randn(1, 4, 768)), progress=False)
    cond = flux.make_conditioning(torch.randn(1, 4, 4096))
    cond.pooled_prompt_embeds = None
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds of shape \[1, 768\]"):
        flux.generate(cond, progress=False)
    cond = sana.make_conditioning(torch.randn(2, 4, 2304))
    cond.attention_mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"attention_mask of shape \[2, 4\]"):
        sana.generate(cond, progress=False)
    cond = sd15.make_conditioning(torch.randn(1, 4, 768))
    cond.negative_prompt_embeds = None
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        sd15.generate(cond, progress=False)
    with pytest.raises(ValueError, match="Unknown decoder family"):
        from thinkdiff.decoders import decoder_class
        decoder_class("dalle")


def test_flux_empty_prompt_pooled_is_clip_of_empty_string(tiny):
    """ThinkDiff's pooled vector: FLUX's CLIP-L pooled embedding of "", computed once; the encoder is then freed."""
    from diffusers import FluxPipeline

    from thinkdiff.decoders.flux import FluxDecoder

    dec = FluxDecoder.from_pretrained(tiny("flux"), keep_components=("text_encoder", "tokenizer"))
    full = FluxPipeline.from_pretrained(tiny("flux"), text_encoder_2=None, tokenizer_2=None)
    ids = full.tokenizer("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = full.text_encoder(ids).pooler_output[0]
    dec.set_empty_prompt_pooled()
    assert dec.pipe.text_encoder is None
    assert torch.allclose(dec.null_pooled, expected, atol=1e-6) and expected.abs().sum() > 0
    cond = dec.make_conditioning(torch.randn(2, 3, 4096))
    assert torch.equal(cond.pooled_prompt_embeds, expected.expand(2, -1))
    with pytest.raises(ValueError, match="needs FLUX's CLIP text encoder"):
        FluxDecoder.from_pretrained(tiny("flux")).set_empty_prompt_pooled()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_sd15_latent_loss_is_diffusers_target_with_min_snr_weights(tiny, prediction):
    """SD15's training loss equals a hand computation: add noise at the generators' timesteps, the scheduler's
    target, and Min-SNR-5 weights in that target's units."""
    from diffusers import DDPMScheduler

    dec = DECODERS["sd15"].from_pretrained(tiny("sd15"))
    dec.pipe.scheduler.register_to_config(prediction_type=prediction)
    tokens, x0 = torch.randn(2, 4, 768), torch.randn(2, 4, 8, 8)

    def gens():
        return [torch.Generator().manual_seed(s) for s in (3, 4)]

    with torch.no_grad():
        plain, weighted = dec.latent_loss(tokens, None, x0, gens()), dec.latent_loss(tokens, None, x0, gens(), 5.0)

        sched = DDPMScheduler.from_config(dec.pipe.scheduler.config)
        noise, t = [], []
        for g in gens():  # each row's generator gives its noise (diffusers' randn_tensor), then its timestep
            noise.append(torch.randn((1, 4, 8, 8), generator=g))
            t.append(torch.randint(0, 1000, (1,), generator=g))
        noise, t = torch.cat(noise), torch.cat(t)
        target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[prediction]
        pred = dec.pipe.unet(sched.add_noise(x0, noise, t), t, tokens).sample
        per_row = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        alpha_bar = sched.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        weight = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1),
                  "sample": snr.clamp(max=5)}[prediction]
    torch.testing.assert_close(plain, per_row.mean())
    torch.testing.assert_close(weighted, (per_row * weight).mean())


def test_sd15_latent_loss_names_the_prediction_types_it_knows(tiny):
    dec = DECODERS["sd15"].from_pretrained(tiny("sd15"))
    dec.pipe.scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="epsilon.*v_prediction.*sample"):
        dec.latent_loss(torch.randn(1, 4, 768), None, torch.randn(1, 4, 8, 8), [torch.Generator().manual_seed(0)])
