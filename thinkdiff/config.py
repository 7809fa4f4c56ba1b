"""Configuration as plain dataclasses, loaded from YAML and overridable from the command line (`key.sub=value`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


@dataclass
class VLMConfig:
    model: str = "tiny:mllama"  # a local folder, a Hugging Face repo id already in the local cache, or tiny:KIND
    backend: str = "transformers"
    dtype: str = "float32"
    device: str = "cpu"
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # ThinkDiff: min = max = 128, so the conditioning always has 128 tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    system: str | None = None
    max_images: int | None = None  # images per request; None = the model's own limit (vllm: 8)
    # vLLM only (None = derived from the model, max_new_tokens and max_images; see vllm_engine.engine_limits):
    max_model_len: int | None = None  # prompt + answer tokens per request (default 4096 prompt tokens + answer)
    max_num_batched_tokens: int | None = None  # tokens per engine step (Mllama: >= all tiles of max_images images)
    gpu_memory_utilization: float | None = None  # share of the GPU vLLM takes (None: derived, see memory plan)
    tensor_parallel_size: int = 1
    kv_cache_gib: float | None = None  # KV cache size; on CPU default 1 GiB (VLLM_CPU_KVCACHE_SPACE)


@dataclass
class AlignerSection:
    path: str | None = None  # a folder written by Aligner.save_pretrained / train.py; None = random init
    layer: int = -1  # used only without `path` (a trained aligner knows its layer)
    embed: str = "output"  # "output" | "input" | "both" | "predicting" (ThinkDiff's fork), likewise
    seed: int = 0  # initialisation seed without `path`


@dataclass
class DecoderConfig:
    family: str = "flux"  # flux | sd3 | sd15 | sana | qwenimage
    model: str = "tiny:flux"
    dtype: str = "float32"
    device: str = "cpu"
    pooled: str | None = None  # pooled vector: None = the family's default (FLUX: empty_prompt, i.e. CLIP of "",
    #                           ThinkDiff's choice; SD3: zeros; others have none). FLUX/SD3 also take "zeros".
    offload: str = "none"  # none | model | sequential: diffusers' enable_model/sequential_cpu_offload (GPU only)
    vae_tiling: bool = False  # decode the image in tiles (diffusers' vae.enable_tiling): less memory at large sizes
    height: int = 512
    width: int = 512
    num_inference_steps: int = 28
    guidance_scale: float | None = None  # None = the family's default


@dataclass
class InferenceConfig:
    vlm: VLMConfig = field(default_factory=VLMConfig)
    aligner: AlignerSection = field(default_factory=AlignerSection)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    seed: int = 42


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys with the list of valid ones."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"Unknown config key {where}{sorted(unknown)[0]!r}; valid keys here: {sorted(names)}.")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = options[0] if len(options) == 1 and value is not None else hint
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        elif hint in (float, float | None) and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:  # YAML reads 3e-3 (no dot) as a string
                kwargs[name] = float(value)
            except ValueError:
                raise ValueError(f"Config key {where}{name} must be a number, got {value!r}.") from None
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML: numbers, true/false, null, lists) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form key.sub=value.")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r}: {part!r} is not a section.")
        node[leaf] = yaml.safe_load(value)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML at `path` (or start from defaults), apply overrides, build `cls`."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} not found.")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


# ------------------------------------------------------------------------------------- alignment training

# ThinkDiff's stage-1 instructions (a subset of its 16 "brief instructions"): the VLM's answers become captions
# or diffusion prompts.
THINKDIFF_PROMPTS = [
    "Describe the image concisely.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Write a clear prompt to guide a 2D diffusion model in recreating the image.",
    "Provide a brief description of the given image.",
]


@dataclass
class DataConfig:
    source: str = ""  # a folder of images (+ same-name .txt captions), a .jsonl manifest, or a folder of .tar shards
    prompts: list[str] = field(default_factory=lambda: list(THINKDIFF_PROMPTS))
    image_size: int = 64  # diffusion targets are centre-cropped and resized to this many pixels
    limit: int | None = None  # use only the first N samples


@dataclass
class ObjectiveConfig:
    name: str = "t5_decoder"  # t5_decoder | diffusion | regression
    t5_model: str = "tiny:t5"  # t5_decoder: frozen T5 whose decoder reads the aligned tokens (ThinkDiff: flan-t5-xxl)
    max_split: int = 128  # t5_decoder: the aligner sees the first k ~ U[1, min(len - 1, max_split)] answer tokens
    t5_dtype: str | None = None  # t5_decoder: the frozen T5's dtype; None = bfloat16 on a GPU, float32 on the CPU
    text_encoder: str = "tiny:t5"  # regression: the T5 encoder whose outputs are the targets (FLUX: t5-v1_1-xxl)
    max_target_tokens: int = 128
    vlm_tokenizer: str | None = None  # where the VLM's tokenizer is (default: vlm.model; set it for backend remote)


@dataclass
class OptimConfig:
    """AdamW + linear warmup from warmup_lr to lr, then cosine to min_lr (ThinkDiff's schedule)."""

    lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2000
    weight_decay: float = 0.05  # not applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = None  # ThinkDiff trains without clipping


@dataclass
class LoopConfig:
    output_dir: str = "runs/align"
    max_steps: int = 1000
    batch_size: int = 8  # global batch per optimizer step, split over processes and accumulation steps
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # sample image every N steps; 0 = only at the end, -1 = never (needs a `decoder:` section)
    log_every: int = 10
    resume: str | None = None  # "latest" (this output_dir's newest checkpoint) or a checkpoint folder
    overwrite: bool = False  # start over in an output_dir that holds another run (removes its checkpoints)
    cache: str | None = None  # feature cache folder (python -m thinkdiff cache); None = run the VLM live
    cache_dtype: str = "bfloat16"
    cache_shard_size: int = 256


@dataclass
class AlignTrainConfig:
    stage: str = "align"
    vlm: VLMConfig = field(default_factory=lambda: VLMConfig(max_new_tokens=32))
    layer: int = -1
    embed: str = "output"
    decoder: DecoderConfig | None = None  # needed by the diffusion objective and for sample images
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


# -------------------------------------------------------------------------------------------------- GRPO


@dataclass
class RareRewardConfig:
    """Rewarding the Rare (arXiv 2601.08763): A = w * z with w = cluster_size ** -alpha."""

    alpha: float = 0.5  # 0 = plain GRPO; the paper does not state its value
    scale: str = "group"  # "group": divide by the group std (GRPO); "none": Dr. GRPO
    judge: str = "embedding"  # embedding (offline MiniLM) | engine (one of our VLM engines) | openai (URL) | none
    judge_model: str | None = None  # judge=engine: model reference; judge=openai: the model name
    judge_url: str | None = None  # judge=openai: base URL of an OpenAI-compatible server (…/v1)
    judge_max_new_tokens: int = 512
    embedding_threshold: float = 0.85  # cosine similarity at which the fallback joins two solutions


@dataclass
class GRPOLossConfig:
    beta: float = 0.001  # KL weight (paper: 0.001)
    eps_low: float = 0.2
    eps_high: float | None = None  # clip-higher (DAPO: 0.28); None = eps_low
    aggregation: str = "grpo"  # grpo | token (DAPO) | dr_grpo
    num_iterations: int = 1  # policy updates per batch of rollouts


@dataclass
class GRPOLoopConfig:
    output_dir: str = "runs/grpo"
    max_steps: int = 100
    problems_per_step: int = 4
    group_size: int = 8  # K rollouts per problem
    lr: float = 5e-7  # paper: AdamW, 5e-7
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" (this output_dir's newest checkpoint) or a checkpoint folder
    overwrite: bool = False  # start over in an output_dir that holds another run (removes its checkpoints)


@dataclass
class GRPOTrainConfig:
    stage: str = "grpo"
    policy: VLMConfig = field(default_factory=lambda: VLMConfig(do_sample=True, temperature=1.0,
                                                                max_new_tokens=256))
    rollout_backend: str = "transformers"  # transformers | vllm (weights synced after every update)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 16
    problems: str = ""  # JSONL of problems (thinkdiff.grpo.problems)
    limit: int | None = None
    reward: RareRewardConfig = field(default_factory=RareRewardConfig)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    train: GRPOLoopConfig = field(default_factory=GRPOLoopConfig)
