"""Will the VLM and the decoder fit? A plan made from the checkpoints' safetensors headers before anything loads.

    plan = plan_memory(config)       # weights per part (read from file headers), KV cache, headroom, device totals
    print(plan.describe())           # logged by ThinkDiffPipeline.from_config
    plan.check()                     # a clear error when a device cannot hold its parts (instead of an OOM halfway)

With the vLLM backend on the decoder's GPU, vLLM pre-allocates `gpu_memory_utilization` of the GPU (weights + KV
cache + its activations); left unset, the plan gives it what the decoder leaves free (ThinkDiff ran vLLM at 0.5
beside FLUX with model CPU offload). Weights are exact (tensor sizes in the files, in the configured dtype); KV
cache, activations and headroom are estimates, stated as such in `describe()`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VLLM_MAX_UTILIZATION = 0.9  # vLLM's own default
SAFETY = 0.95  # share of a device the plan fills at most (CUDA context, fragmentation)


def safetensors_numel(path: Path) -> int:
    """Number of weights in one .safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for dim in info["shape"]:
                n *= dim
            total += n
    return total


def folder_numel(folder: Path) -> int:
    return sum(safetensors_numel(p) for p in Path(folder).glob("*.safetensors"))


def device_total(device: str) -> int | None:
    """Bytes of memory on `device` (a CUDA GPU's total, or this machine's RAM for cpu); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device.index or 0)[1]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


@dataclass
class Part:
    name: str
    device: str
    bytes: int
    estimated: bool = False


@dataclass
class MemoryPlan:
    parts: list[Part] = field(default_factory=list)
    totals: dict[str, int | None] = field(default_factory=dict)
    vllm_utilization: float | None = None  # what the vLLM engine is told to take, when it runs on a GPU

    def used(self, device: str) -> int:
        return sum(p.bytes for p in self.parts if p.device == device)

    def describe(self) -> str:
        lines = ["Memory plan (~ = estimated):"]
        for device in dict.fromkeys(p.device for p in self.parts):
            total = self.totals.get(device)
            total_text = f"{total / GIB:.1f} GiB" if total else "unknown size"
            lines.append(f"  {device} ({total_text}): {self.used(device) / GIB:.2f} GiB planned")
            for p in self.parts:
                if p.device == device:
                    lines.append(f"    {'~' if p.estimated else ' '}{p.bytes / GIB:8.2f} GiB  {p.name}")
        if self.vllm_utilization is not None:
            lines.append(f"  vLLM gpu_memory_utilization: {self.vllm_utilization:.2f}")
        return "\n".join(lines)

    def check(self) -> None:
        for device, total in self.totals.items():
            if total is not None and self.used(device) > SAFETY * total:
                raise ConfigError(
                    f"The models do not fit on {device}: {self.used(device) / GIB:.1f} GiB planned, "
                    f"{total / GIB:.1f} GiB there.\n{self.describe()}\nTry decoder.offload=model (or sequential), "
                    "decoder.dtype=bfloat16, a smaller vlm.max_model_len, or vlm.device / decoder.device on "
                    "different GPUs.")


def _decoder_components(config, path: Path) -> list[str]:
    from .decoders import decoder_class, pooled_mode

    cls = decoder_class(config.family)
    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    skip = set(cls.text_components)
    if pooled_mode(config) == "empty_prompt":
        skip -= {"text_encoder"}
    return [name for name in index if not name.startswith("_") and name not in skip and (path / name).is_dir()]


def plan_memory(config, device_memory: Callable[[str], int | None] = device_total) -> MemoryPlan:
    """The plan for an `InferenceConfig` (weights read from the resolved checkpoints; nothing is loaded)."""
    from transformers import AutoConfig

    from .vlm import VLM_DOWNLOAD_HINT
    from .weights import resolve_model

    vlm, dec = config.vlm, config.decoder
    plan = MemoryPlan()
    if vlm.backend != "remote":
        vlm_path = resolve_model(vlm.model, "vlm.model", hint=VLM_DOWNLOAD_HINT)
        vlm_device = "cuda:0" if vlm.backend == "vllm" and torch.cuda.is_available() and vlm.device == "cpu" \
            else _normal(vlm.device)
        weights = folder_numel(vlm_path) * DTYPE_BYTES[vlm.dtype]
        plan.parts.append(Part(f"VLM weights ({vlm.model}, {vlm.dtype})", vlm_device, weights))
        kv = _kv_cache_bytes(AutoConfig.from_pretrained(vlm_path), vlm)
        plan.parts.append(Part("VLM KV cache and activations", vlm_device, kv, estimated=True))
    dec_path = resolve_model(dec.model, "decoder.model")
    dec_device = _normal(dec.device)
    sizes = {name: folder_numel(dec_path / name) * DTYPE_BYTES[dec.dtype]
             for name in _decoder_components(dec, dec_path)}
    sizes = {name: size for name, size in sizes.items() if size}  # schedulers and tokenizers hold no weights
    resident = sum(sizes.values())
    if dec.offload == "model" and dec_device != "cpu":  # one component on the GPU at a time
        resident = max(sizes.values(), default=0)
        plan.parts.append(Part("decoder weights at rest on the CPU (model offload)", "cpu", sum(sizes.values())))
    elif dec.offload == "sequential" and dec_device != "cpu":  # one layer at a time
        resident = 0
        plan.parts.append(Part("decoder weights at rest on the CPU (sequential offload)", "cpu", sum(sizes.values())))
    plan.parts.append(Part(f"decoder weights ({dec.model}, {dec.dtype}: {', '.join(sizes)})", dec_device, resident))
    plan.parts.append(Part("decoder activations", dec_device, _decoder_activation_bytes(dec), estimated=True))
    for device in dict.fromkeys(p.device for p in plan.parts):
        plan.totals[device] = device_memory(device)
    if vlm.backend == "vllm" and vlm_device.startswith("cuda"):
        _fit_vllm(plan, vlm, vlm_device)
    return plan


def _fit_vllm(plan: MemoryPlan, vlm, device: str) -> None:
    """vLLM takes `gpu_memory_utilization` of the whole GPU up front: set it to what the other parts leave."""
    total = plan.totals.get(device)
    vlm_parts = [p for p in plan.parts if p.device == device and p.name.startswith("VLM")]
    needed = sum(p.bytes for p in vlm_parts)
    if vlm.gpu_memory_utilization is not None or vlm.kv_cache_gib is not None or not total:
        plan.vllm_utilization = vlm.gpu_memory_utilization
        if vlm.gpu_memory_utilization is not None and total:  # vLLM takes exactly this much
            for p in vlm_parts:
                plan.parts.remove(p)
            plan.parts.append(Part(f"vLLM (gpu_memory_utilization={vlm.gpu_memory_utilization})", device,
                                   int(vlm.gpu_memory_utilization * total)))
        return
    others = plan.used(device) - needed
    share = min(VLLM_MAX_UTILIZATION, (SAFETY * total - others) / total)
    if share * total < needed:
        raise ConfigError(f"vLLM needs about {needed / GIB:.1f} GiB on {device} but only {share * total / GIB:.1f} GiB "
                         f"are left beside the decoder.\n{plan.describe()}\nTry decoder.offload=model, or "
                         "decoder.device on another GPU.")
    plan.vllm_utilization = round(share, 3)
    for p in vlm_parts:
        plan.parts.remove(p)
    plan.parts.append(Part(f"vLLM (weights, KV cache, activations; gpu_memory_utilization={share:.2f})", device,
                           int(share * total), estimated=True))


def _kv_cache_bytes(hf_config, vlm) -> int:
    """One longest request's self-attention KV cache (+ Mllama's cross-attention cache for max_images images) and
    ~1 GiB of activations: what vLLM needs at least, and more than the transformers engine uses per request."""
    from .vlm.transformers_engine import model_family
    from .vlm.vllm_engine import DEFAULT_PROMPT_TOKENS, mm_tokens_per_request

    text = hf_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token_layer = 2 * kv_heads * head_dim * DTYPE_BYTES[vlm.dtype]
    tokens = vlm.max_model_len or DEFAULT_PROMPT_TOKENS + vlm.max_new_tokens + 1
    cross = list(getattr(text, "cross_attention_layers", None) or [])
    family = model_family(hf_config)
    max_images = 8 if vlm.max_images is None else vlm.max_images
    cross_bytes = len(cross) * per_token_layer * mm_tokens_per_request(hf_config, family, max_images)
    self_bytes = (text.num_hidden_layers - len(cross)) * per_token_layer * tokens
    return self_bytes + cross_bytes + GIB


def _decoder_activation_bytes(dec) -> int:
    """Peak activations while denoising and VAE-decoding one image, an estimate: 1 GiB + 4 KiB per output pixel at
    2-byte dtypes (the VAE decoder's full-resolution feature maps; 16 B with VAE tiling): ~5 GiB at 1024x1024,
    ~1 GiB with tiling."""
    pixels = dec.height * dec.width
    per_pixel = (16 if dec.vae_tiling else 4 * 1024) * DTYPE_BYTES[dec.dtype] // 2
    return GIB + pixels * per_pixel


def _normal(device: str) -> str:
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
