"""The `vllm.general_plugins` entry point: serve Mllama (Llama-3.2-Vision) checkpoints with vllm_mllama.py.

vLLM calls `register()` in every engine process. On a vLLM version other than the one vllm_mllama.py is written
for, it logs why and registers nothing, so vLLM keeps its own handling of Mllama checkpoints.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "MllamaForConditionalGeneration"


def register() -> bool:
    """Register our Mllama for `MllamaForConditionalGeneration` checkpoints; False (with a logged reason) when this
    vLLM version is not supported. Load checkpoints with `hf_overrides={"is_encoder_decoder": True}` and
    `enforce_eager=True` (see vllm_mllama.py)."""
    import vllm

    from .vllm_compat import version_error

    if (message := version_error(vllm.__version__)) is not None:
        logger.warning("Not registering thinkdiff's Mllama model: %s", message)
        return False
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "thinkdiff.vlm.vllm_mllama:MllamaForConditionalGeneration")
    return True
