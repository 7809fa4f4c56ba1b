"""The memory plan (weights from safetensors headers, fit checks, vLLM's share) and the decoder's placement knobs."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from thinkdiff.config import InferenceConfig, load_config
from thinkdiff.memory_plan import GIB, plan_memory

TINY = "configs/tiny.yaml"


def numel(module):
    return sum(p.numel() for p in module.parameters())


def test_weights_in_the_plan_are_the_loaded_parameters(engine):
    from thinkdiff.decoders import load_decoder

    config = load_config(InferenceConfig, TINY)
    plan = plan_memory(config, device_memory=lambda device: 64 * GIB)
    parts = {p.name.split(" (")[0]: p for p in plan.parts}
    assert parts["VLM weights"].bytes == numel(engine("mllama").model) * 4 and not parts["VLM weights"].estimated
    decoder = load_decoder(config.decoder)  # FLUX with its CLIP kept for the pooled vector of ""
    loaded = sum(numel(m) for m in decoder.pipe.components.values() if isinstance(m, torch.nn.Module))
    clip = 0 if decoder.pipe.text_encoder is not None else parts["decoder weights"].bytes // 4 - loaded
    assert parts["decoder weights"].bytes == (loaded + clip) * 4 and clip > 0  # CLIP is loaded, used, dropped
    assert "text_encoder" in parts["decoder weights"].name and "text_encoder_2" not in parts["decoder weights"].name
    plan.check()
    assert "GiB" in plan.describe() and "~" in plan.describe()


def test_a_plan_that_does_not_fit_stops_before_loading():
    from thinkdiff.pipeline import ThinkDiffPipeline

    config = load_config(InferenceConfig, TINY)
    with pytest.raises(ValueError, match="(?s)do not fit on cpu.*decoder.offload=model"):
        plan_memory(config, device_memory=lambda device: GIB).check()
    # The pipeline checks the same plan before it loads anything (this host's RAM is large enough for tiny models).
    ThinkDiffPipeline.from_config(config)


def test_vllm_takes_what_the_decoder_leaves_on_its_gpu():
    config = load_config(InferenceConfig, TINY, ["vlm.backend=vllm", "vlm.device=cuda:0", "decoder.device=cuda:0"])
    plan = plan_memory(config, device_memory=lambda device: 8 * GIB if device == "cuda:0" else 64 * GIB)
    decoder = sum(p.bytes for p in plan.parts if p.device == "cuda:0" and p.name.startswith("decoder"))
    assert plan.vllm_utilization == pytest.approx(min(0.9, (0.95 * 8 * GIB - decoder) / (8 * GIB)), abs=1e-3)
    plan.check()
    with pytest.raises(ValueError, match="vLLM needs about"):
        plan_memory(config, device_memory=lambda device: 2 * GIB)
    fixed = load_config(InferenceConfig, TINY, ["vlm.backend=vllm", "vlm.device=cuda:0", "decoder.device=cuda:0",
                                                "vlm.gpu_memory_utilization=0.9"])
    with pytest.raises(ValueError, match="do not fit on cuda:0"):  # 0.9 of the GPU + the decoder
        plan_memory(fixed, device_memory=lambda device: 8 * GIB).check()
    apart = load_config(InferenceConfig, TINY, ["vlm.backend=vllm", "vlm.device=cuda:0", "decoder.device=cuda:1"])
    assert plan_memory(apart, device_memory=lambda device: 8 * GIB).vllm_utilization == 0.9


def test_model_offload_keeps_only_the_largest_component_on_the_gpu():
    config = load_config(InferenceConfig, TINY, ["decoder.device=cuda:0", "decoder.offload=model"])
    plan = plan_memory(config, device_memory=lambda device: 64 * GIB)
    on_gpu = next(p for p in plan.parts if p.device == "cuda:0" and p.name.startswith("decoder weights"))
    at_rest = next(p for p in plan.parts if "at rest" in p.name)
    assert 0 < on_gpu.bytes < at_rest.bytes


def test_offload_on_the_cpu_is_a_warned_no_op_and_tiling_is_switched_on(caplog):
    from thinkdiff.decoders import load_decoder

    config = load_config(InferenceConfig, TINY).decoder
    tokens = torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(0))

    def image(dec):
        return np.asarray(dec.generate(dec.make_conditioning(tokens), height=64, width=64, num_inference_steps=2,
                                       progress=False)[0])

    reference = image(load_decoder(config))
    with caplog.at_level(logging.WARNING):
        offloaded = load_decoder(dataclasses.replace(config, offload="model"))
    assert "has no effect" in caplog.text and np.array_equal(image(offloaded), reference)
    tiled = load_decoder(dataclasses.replace(config, vae_tiling=True))
    assert tiled.pipe.vae.use_tiling and image(tiled).shape == reference.shape  # diffusers decodes in tiles
    with pytest.raises(ValueError, match="offload\n  Input should be 'none', 'model' or 'sequential'"):
        dataclasses.replace(config, offload="gpu")  # the config itself refuses it (pydantic), before any load
