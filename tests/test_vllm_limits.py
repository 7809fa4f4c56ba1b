"""vLLM engine limits derived for real model sizes (no weights needed): Llama-3.2-11B-Vision's own config."""

import os

import pytest


def llama32_vision_config():
    """meta-llama/Llama-3.2-11B-Vision-Instruct's config.json values that the limits depend on."""
    from transformers import MllamaConfig

    text = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], bos_token_id=128000,
                eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    vision = dict(image_size=560, patch_size=14, max_num_tiles=4, hidden_size=1280, num_hidden_layers=32,
                  num_global_layers=8, attention_heads=16, intermediate_size=5120, vision_output_dim=7680,
                  intermediate_layers_indices=[3, 7, 15, 23, 30])
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=128256)


def test_defaults_fit_llama32_vision_with_4_tile_images():
    from thinkdiff.vlm.vllm_engine import engine_limits, mm_tokens_per_request

    config = llama32_vision_config()
    assert mm_tokens_per_request(config, "mllama", 1) == 4 * (40 * 40 + 1) == 6404
    # ThinkDiff's 128 answer tokens (+1) after up to 4096 prompt tokens, not the model's 131072 positions; a step
    # holds all tiles of 8 images, which vLLM schedules at once (the error a bare max_model_len gave).
    assert engine_limits(config, "mllama", 8, 128, on_cpu=False) == {"max_model_len": 4225,
                                                                      "max_num_batched_tokens": 51232}
    assert engine_limits(config, "mllama", 2, 128, on_cpu=False, max_model_len=8192) == {
        "max_model_len": 8192, "max_num_batched_tokens": 12808}
    assert engine_limits(config, "mllama", 0, 128, on_cpu=True, max_model_len=16384)["max_num_batched_tokens"] == 16384
    with pytest.raises(ValueError, match="max_num_batched_tokens=4096 is too small: 8 images .* at least 51232"):
        engine_limits(config, "mllama", 8, 128, on_cpu=False, max_num_batched_tokens=4096)
    with pytest.raises(ValueError, match="exceeds the model's 131072 positions"):
        engine_limits(config, "mllama", 8, 128, on_cpu=False, max_model_len=200_000)


def test_kv_cache_estimate_for_llama32_vision(tmp_path):
    """The memory plan's VLM KV estimate at real size: 32 self-attention layers x 4225 tokens + 8 cross-attention
    layers x 51232 image tokens, 8 KV heads of 128 in bf16, plus 1 GiB of activations."""
    from thinkdiff.config import VLMConfig
    from thinkdiff.memory_plan import GIB, _kv_cache_bytes

    kv = _kv_cache_bytes(llama32_vision_config(), VLMConfig(dtype="bfloat16", max_new_tokens=128))
    per_token_layer = 2 * 8 * 128 * 2
    assert kv == per_token_layer * (32 * 4225 + 8 * 51232) + GIB


def test_engine_environment():
    from thinkdiff.vlm.vllm_engine import _set_vllm_env, device_environment

    saved = {k: os.environ.pop(k, None) for k in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_CPU_KVCACHE_SPACE")}
    try:
        _set_vllm_env(kv_cache_gib=3)
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    assert device_environment("cuda:0", None) == {} and device_environment(None, None) == {}
    assert device_environment("cuda:1", "4,5,6") == {"CUDA_VISIBLE_DEVICES": "5", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with pytest.raises(ValueError, match="only 2 GPUs are visible"):
        device_environment("cuda:2", "0,1")
