"""The VLM policy being trained: a transformers model (full or LoRA through peft), its reference copy for the KL
term, and per-token log-probabilities of completions. Any VLM our transformers engine runs works, Mllama with
images included."""

from __future__ import annotations

import copy
import logging
import math
from contextlib import nullcontext

import torch

from ..atomic import save_safetensors
from ..errors import InputError
from ..rng import generator
from ..vlm import VLMRequest
from ..vlm.transformers_engine import TransformersEngine, load_model

logger = logging.getLogger(__name__)


class Policy:
    """Owns the model being trained (`model`, peft-wrapped with LoRA) and a transformers engine that samples from it
    (`engine`, which only reads it). `merged_weights()` is what a separate rollout engine loads after each update."""

    def __init__(self, model_path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 max_images: int | None = None, lora_rank: int = 0, lora_alpha: int = 16,
                 lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), keep_reference: bool = True,
                 seed: int = 0, batch_size: int = 8):
        self.lora = lora_rank > 0
        model = load_model(model_path, dtype, device)
        if self.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                                     target_modules=list(lora_targets)))
            _init_lora(model, seed)
        self.model = model.eval()
        self.trained = self.model  # what training forward passes call: the model, or its DDP wrapper (distribute)
        self.engine = TransformersEngine(model_path, dtype=dtype, device=device, max_images=max_images, model=model,
                                         batch_size=batch_size)
        # The reference policy: with LoRA the adapters are switched off, otherwise a frozen copy of the start.
        self.reference = None
        if keep_reference and not self.lora:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def merged_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The current weights as (name, tensor) pairs under the checkpoint's own names, LoRA merged in."""
        if not self.lora:
            return [(name, t.detach()) for name, t in self.model.state_dict().items()]
        self.model.merge_adapter()
        try:
            return [(name.replace(".base_layer", ""), t.detach().clone())
                    for name, t in self.model.get_base_model().state_dict().items() if "lora_" not in name]
        finally:
            self.model.unmerge_adapter()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def distribute(self, accelerator) -> None:
        """Forward passes that train go through accelerate's DistributedDataParallel wrapper, which averages
        gradients over processes during backward (one process: the model itself). Build the accelerator with
        `DistributedDataParallelKwargs(find_unused_parameters=True)`: Mllama's cross-attention layers idle on a
        text-only batch."""
        self.trained = accelerator.prepare_model(self.model)

    def batch_inputs(self, requests: list[VLMRequest], completions: list[torch.Tensor]) -> list[tuple]:
        """Forward inputs of the prompts + completions, one padded batch per kind of request (with images, without):
        (rows of `requests`, the model's inputs, the batch's longest completion). `logprobs` takes them, so the
        policy and reference passes of one batch share them."""
        batches = []
        for has_images in (True, False):
            rows = [i for i, r in enumerate(requests) if bool(r.images) == has_images]
            if rows:
                inputs = self.engine.batch_forward_inputs([requests[i] for i in rows], [completions[i] for i in rows])
                batches.append((rows, inputs, max(len(completions[i]) for i in rows)))
        return batches

    def logprobs(self, requests: list[VLMRequest], completions: list[torch.Tensor], temperature: float = 1.0,
                 reference: bool = False, inputs: list[tuple] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(token_j | prompt, tokens < j) of every completion token in padded batched passes (`inputs`, from
        `batch_inputs` when not given): logp [B, T] (grad unless `reference`) and its mask [B, T], T the longest
        completion. Each row equals the request's own unpadded pass."""
        if reference and self.lora:
            model, context = self.model, self.model.disable_adapter()
        elif reference:
            model, context = self.reference, nullcontext()
        else:
            model, context = self.trained, nullcontext()
        width = max(len(c) for c in completions)
        rows, parts = [], []
        with context, torch.set_grad_enabled(not reference and torch.is_grad_enabled()):
            for group, batch, w in inputs if inputs is not None else self.batch_inputs(requests, completions):
                # the last w + 1 positions but the final one: position P - 1 + j predicts completion token j
                logits = model(**batch, use_cache=False, logits_to_keep=w + 1).logits[:, :-1].float() / temperature
                targets = batch["input_ids"][:, -w:] if w else batch["input_ids"][:, :0]
                part = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
                parts.append(torch.nn.functional.pad(part, (0, width - w)))
                rows += group
        logp = torch.cat(parts)[torch.tensor(rows).argsort()]
        mask = torch.zeros(len(completions), width)
        for i, c in enumerate(completions):
            mask[i, :len(c)] = 1
        return logp, mask.to(logp.device)

    def save_trainable(self, path) -> None:
        """What training changes (full weights, or the LoRA adapters) in one safetensors file, under the model's
        own parameter names (resume reads it back with `load_trainable`)."""
        if self.lora:
            from peft import get_peft_model_state_dict

            save_safetensors(get_peft_model_state_dict(self.model), path)
        else:
            from safetensors.torch import save_model

            save_model(self.model, str(path))  # drops tied duplicates

    def load_trainable(self, path) -> None:
        if self.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(self.model, load_file(str(path)))
            if result.unexpected_keys:
                raise InputError(f"The checkpoint {path} does not fit this policy's adapters "
                                 f"(unexpected {result.unexpected_keys[:3]}).")
        else:
            from safetensors.torch import load_model

            load_model(self.model, str(path), strict=True)

    def save_pretrained(self, directory) -> None:
        """Full weights or LoRA adapters, safetensors."""
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.engine.processor.save_pretrained(str(directory))


@torch.no_grad()
def _init_lora(model: torch.nn.Module, seed: int) -> None:
    """peft's LoRA initialisation (A kaiming-uniform, B zeros), drawn from generators keyed by (seed, module
    index) instead of torch's global RNG."""
    index = 0
    for module in model.modules():
        for adapter in getattr(module, "lora_A", {}) or {}:
            torch.nn.init.kaiming_uniform_(module.lora_A[adapter].weight, a=math.sqrt(5),
                                           generator=generator(seed, index))
            torch.nn.init.zeros_(module.lora_B[adapter].weight)
            index += 1

