"""VLM engines behind one interface. `make_engine(VLMConfig)` picks the backend.

| family          | transformers        | vllm (0.32)                                           | remote               |
| --------------- | ------------------- | ----------------------------------------------------- | -------------------- |
| Llama (text)    | yes (reference)     | yes                                                   | what the server runs |
| Mllama + images | yes (reference)     | yes, through our plugin (vllm_mllama.py)              | what the server runs |
| Mllama, text    | yes                 | yes, through our plugin                               | what the server runs |
| Qwen2-VL family | yes (PIL processor) | needs torchvision (vLLM's own Qwen2-VL code)          | what the server runs |
"""

from __future__ import annotations

from ..errors import ConfigError
from .engine import IMAGE_MARKER, MLLAMA_SYSTEM_ERROR, HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest

BACKENDS = ("transformers", "vllm", "remote")
# `hf download` arguments for a VLM: Meta's repos also hold the native checkpoint (original/, 20+ GB) we never read.
VLM_DOWNLOAD_HINT = '--exclude "original/*"'


def make_engine(config) -> HiddenStateEngine:
    """An engine for `config` (a `thinkdiff.config.VLMConfig`). For `remote`, `config.model` is the server's URL."""
    from ..config import torch_dtype
    from ..weights import resolve_model

    if config.backend not in BACKENDS:
        raise ConfigError(f"Unknown VLM backend {config.backend!r}; choose one of {', '.join(BACKENDS)}.")
    if config.backend == "remote":
        from .remote_engine import RemoteEngine

        return RemoteEngine(config.model)
    path = resolve_model(config.model, "vlm.model", hint=VLM_DOWNLOAD_HINT)
    check_system_prompt(config, path)
    dtype = torch_dtype(config.dtype)
    if config.backend == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(path, dtype=dtype, max_images=config.max_images, max_model_len=config.max_model_len,
                          max_num_batched_tokens=config.max_num_batched_tokens, max_new_tokens=config.max_new_tokens,
                          gpu_memory_utilization=config.gpu_memory_utilization,
                          tensor_parallel_size=config.tensor_parallel_size, kv_cache_gib=config.kv_cache_gib,
                          device=None if config.device == "cpu" else config.device)
    from .transformers_engine import TransformersEngine

    return TransformersEngine(path, dtype=dtype, device=config.device, max_images=config.max_images)


def check_system_prompt(config, path) -> None:
    """Mllama refuses a system message next to images: reject `vlm.system` before the model loads (text-only use,
    `vlm.max_images=0`, may keep it)."""
    from transformers import AutoConfig

    if config.system and config.max_images != 0 and AutoConfig.from_pretrained(str(path)).model_type == "mllama":
        raise ConfigError(f"vlm.system is set for {config.model}: {MLLAMA_SYSTEM_ERROR}")


def sampling_from(config) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                          do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p)


__all__ = ["BACKENDS", "IMAGE_MARKER", "HiddenStateEngine", "HiddenStates", "SamplingConfig", "VLMRequest",
           "make_engine", "sampling_from"]
