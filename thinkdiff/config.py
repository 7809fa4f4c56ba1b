"""Configuration as typed dataclasses (pydantic), validated once when loaded from YAML and `key.sub=value`
overrides. Every entry point loads through `load_config` (or `load_training_config`, which picks the class by the
config's `stage`), so a wrong key, type, choice or shape is one line naming the key, before anything loads."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import torch
import yaml
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from .errors import ConfigError, MissingFileError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Dtype = Literal["float32", "bfloat16", "float16"]
Embed = Literal["output", "input", "both", "predicting"]  # see HiddenStates.embed
PositiveInt = Annotated[int, pydantic.Field(ge=1)]
Fraction = Annotated[float, pydantic.Field(ge=0.0, le=1.0)]

# Unknown keys are errors; values are converted only where nothing is lost ("3e-3" -> 0.003, 2 -> 2.0).
config_dataclass = _pydantic_dataclass(config=pydantic.ConfigDict(extra="forbid"))


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


@config_dataclass
class VLMConfig:
    model: str = "tiny:mllama"  # a local folder, a Hugging Face repo id already in the local cache, or tiny:KIND
    backend: Literal["transformers", "vllm", "remote"] = "transformers"  # remote: `model` is the server's URL
    dtype: Dtype = "float32"
    device: str = "cpu"
    max_new_tokens: PositiveInt = 32
    min_new_tokens: Annotated[int, pydantic.Field(ge=0)] = 0  # ThinkDiff: min = max = 128 (always 128 tokens)
    do_sample: bool = False
    temperature: Annotated[float, pydantic.Field(gt=0.0)] = 1.0
    top_p: Annotated[float, pydantic.Field(gt=0.0, le=1.0)] = 1.0
    system: str | None = None
    max_images: Annotated[int, pydantic.Field(ge=0)] | None = None  # per request; None = the model's limit (vllm: 8)
    # vLLM only (None = derived from the model, max_new_tokens and max_images; see vllm_engine.engine_limits):
    max_model_len: PositiveInt | None = None  # prompt + answer tokens per request (default 4096 prompt + answer)
    max_num_batched_tokens: PositiveInt | None = None  # tokens per engine step (Mllama: >= all tiles of max_images)
    gpu_memory_utilization: Annotated[float, pydantic.Field(gt=0.0, le=1.0)] | None = None  # None: memory plan
    tensor_parallel_size: PositiveInt = 1
    kv_cache_gib: Annotated[float, pydantic.Field(gt=0.0)] | None = None  # KV cache; CPU default 1 GiB

    def __post_init__(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")


@config_dataclass
class AlignerSection:
    path: str | None = None  # a folder written by Aligner.save_pretrained / train.py; None = random init
    layer: int = -1  # used only without `path` (a trained aligner knows its layer)
    embed: Embed = "output"  # likewise; "predicting" = ThinkDiff's fork
    seed: int = 0  # initialisation seed without `path`


@config_dataclass
class DecoderConfig:
    family: Literal["flux", "sd3", "sd15", "sana", "qwenimage"] = "flux"
    model: str = "tiny:flux"
    dtype: Dtype = "float32"
    device: str = "cpu"
    # The pooled vector: None = the family's default (FLUX: empty_prompt, i.e. CLIP of "", ThinkDiff's choice;
    # SD3: zeros; the others have none). FLUX/SD3 also take "zeros".
    pooled: Literal["zeros", "empty_prompt", "none"] | None = None
    offload: Literal["none", "model", "sequential"] = "none"  # diffusers' enable_model/sequential_cpu_offload (GPU)
    vae_tiling: bool = False  # decode the image in tiles (diffusers' vae.enable_tiling): less memory at large sizes
    height: PositiveInt = 512
    width: PositiveInt = 512
    num_inference_steps: PositiveInt = 28
    guidance_scale: float | None = None  # None = the family's default


@config_dataclass
class InferenceConfig:
    vlm: VLMConfig = field(default_factory=VLMConfig)
    aligner: AlignerSection = field(default_factory=AlignerSection)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    seed: int = 42


T = typing.TypeVar("T")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML: numbers, true/false, null, lists) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key.sub=value.")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {part!r} is not a section.")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"Override {item!r}: the value is not valid YAML ({_yaml_problem(err)}).") from None
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; a missing file or a syntax error is one line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Config file {path} not found.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values, got {type(data).__name__}.")
    return data


def from_dict(cls: type[T], data: dict | None, source: str = "config") -> T:
    """Build and validate config class `cls` from nested dicts; every problem is one line naming its key."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(data or {}))
    except pydantic.ValidationError as err:
        raise ConfigError(_describe(err, cls, source)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML at `path` (or start from defaults), apply `key.sub=value` overrides, build and validate `cls`."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, list(overrides)), str(path) if path is not None else "config")


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(err, "problem", None) or err).strip()


def _describe(err: pydantic.ValidationError, cls, source: str) -> str:
    """pydantic's errors as `source: key.sub: what is wrong (got value)`, the first few, one line."""
    parts = []
    for e in err.errors()[:3]:
        key = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".") or "(top level)"
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(f"unknown key {key!r}; valid keys here: {_valid_keys(cls, e['loc'][:-1])}")
        elif e["type"] == "literal_error":
            parts.append(f"{key}={e['input']!r}: {e['msg'].lower().replace('input should be', 'choose')}")
        elif e["type"] == "missing":
            parts.append(f"{key} is missing")
        elif e["type"] == "value_error":
            parts.append(f"{key}: {str(e['ctx'].get('error', e['msg']))}" if key != "(top level)" else
                         str(e["ctx"].get("error", e["msg"])))
        else:
            parts.append(f"{key}={e['input']!r}: {e['msg'].lower()}")
    more = f" (and {len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more + "."


def _valid_keys(cls, loc) -> list[str]:
    for part in (x for x in loc if not isinstance(x, int)):
        hints = typing.get_type_hints(cls, include_extras=False)
        hint = hints.get(part)
        options = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] if hint else []
        cls = hint if dataclasses.is_dataclass(hint) else (options[0] if options else None)
        if cls is None:
            return []
    return sorted(f.name for f in dataclasses.fields(cls))


# ------------------------------------------------------------------------------------- alignment training

# ThinkDiff's stage-1 instructions (a subset of its 16 "brief instructions"): the VLM's answers become captions
# or diffusion prompts.
THINKDIFF_PROMPTS = [
    "Describe the image concisely.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Write a clear prompt to guide a 2D diffusion model in recreating the image.",
    "Provide a brief description of the given image.",
]


@config_dataclass
class DataConfig:
    source: str = ""  # a folder of images (+ same-name .txt captions), a .jsonl manifest, or a folder of .tar shards
    prompts: Annotated[list[str], pydantic.Field(min_length=1)] = field(default_factory=lambda: list(THINKDIFF_PROMPTS))
    image_size: PositiveInt = 64  # diffusion targets are centre-cropped and resized to this many pixels
    limit: PositiveInt | None = None  # use only the first N samples


@config_dataclass
class ObjectiveConfig:
    name: Literal["t5_decoder", "diffusion", "regression"] = "t5_decoder"
    t5_model: str = "tiny:t5"  # t5_decoder: frozen T5 whose decoder reads the aligned tokens (ThinkDiff: flan-t5-xxl)
    # t5_decoder: the aligner sees the first k ~ U[1, min(len - 1, max_split)] answer tokens
    max_split: PositiveInt = 128
    # t5_decoder: False = ThinkDiff's `random_split_output_embed: False` (paper Table 3, "w/o masked training"): the
    # aligner sees every answer state and the decoder writes the whole answer back
    split: bool = True
    t5_dtype: Dtype | None = None  # t5_decoder: the frozen T5's dtype; None = bfloat16 on a GPU, float32 on the CPU
    text_encoder: str = "tiny:t5"  # regression: the T5 encoder whose outputs are the targets (FLUX: t5-v1_1-xxl)
    max_target_tokens: PositiveInt = 128
    vlm_tokenizer: str | None = None  # where the VLM's tokenizer is (default: vlm.model; set it for backend remote)
    # The aligner's RMSNorm weight at the start: "encoder" = the text encoder's final norm (ThinkDiff; t5_decoder and
    # regression), "ones" = the default init (ThinkDiff's Fig. 7 ablation).
    norm_init: Literal["encoder", "ones"] = "encoder"


@config_dataclass
class OptimConfig:
    """AdamW + linear warmup from warmup_lr to lr, then cosine to min_lr (ThinkDiff's schedule)."""

    lr: Annotated[float, pydantic.Field(gt=0.0)] = 1e-4
    min_lr: Annotated[float, pydantic.Field(ge=0.0)] = 8e-5
    warmup_lr: Annotated[float, pydantic.Field(ge=0.0)] = 1e-6
    warmup_steps: Annotated[int, pydantic.Field(ge=0)] = 2000
    weight_decay: Annotated[float, pydantic.Field(ge=0.0)] = 0.05  # not applied to biases and norm weights
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    max_grad_norm: Annotated[float, pydantic.Field(gt=0.0)] | None = None  # ThinkDiff trains without clipping


@config_dataclass
class LoopConfig:
    output_dir: str = "runs/align"
    max_steps: PositiveInt = 1000
    batch_size: PositiveInt = 8  # global batch per optimizer step, split over processes and accumulation steps
    gradient_accumulation_steps: PositiveInt = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # accelerate
    seed: int = 0
    checkpoint_every: Annotated[int, pydantic.Field(ge=0)] = 500  # 0 = only when interrupted
    keep_checkpoints: PositiveInt = 2
    # A sample image every N steps; 0 = only at the end, -1 = never (needs a `decoder:` section)
    sample_every: Annotated[int, pydantic.Field(ge=-1)] = 0
    log_every: PositiveInt = 10
    resume: str | None = None  # "latest" (this output_dir's newest checkpoint) or a checkpoint folder
    overwrite: bool = False  # start over in an output_dir that holds another run (removes its checkpoints)
    cache: str | None = None  # feature cache folder (python -m thinkdiff cache); None = run the VLM live
    cache_dtype: Dtype = "bfloat16"
    cache_shard_size: PositiveInt = 256


@config_dataclass
class AlignTrainConfig:
    stage: Literal["align"] = "align"
    vlm: VLMConfig = field(default_factory=lambda: VLMConfig(max_new_tokens=32))
    layer: int = -1
    embed: Embed = "output"
    decoder: DecoderConfig | None = None  # needed by the diffusion objective and for sample images
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


# -------------------------------------------------------------------------------------------------- GRPO


@config_dataclass
class RareRewardConfig:
    """Rewarding the Rare (arXiv 2601.08763): A = w * z with w = cluster_size ** -alpha."""

    alpha: Fraction = 0.5  # 0 = plain GRPO; the paper does not state its value
    scale: Literal["group", "none"] = "group"  # "group": divide by the group std (GRPO); "none": Dr. GRPO
    # embedding (offline MiniLM) | engine (one of our VLM engines) | openai (URL) | none | a name registered with
    # thinkdiff.grpo.strategies.register_judge (e.g. addition-method, the collapse experiment's program)
    judge: str = "embedding"
    judge_model: str | None = None  # judge=engine: model reference; judge=openai: the model name
    judge_url: str | None = None  # judge=openai: base URL of an OpenAI-compatible server (…/v1)
    judge_max_new_tokens: PositiveInt = 512
    # The cosine similarity at which the fallback joins two solutions
    embedding_threshold: Annotated[float, pydantic.Field(ge=-1.0, le=1.0)] = 0.85

    @pydantic.field_validator("judge")
    @classmethod
    def _known_judge(cls, name: str) -> str:
        from .grpo.strategies import judge_names

        if name not in judge_names():
            raise ValueError(f"{name!r} is not a judge; choose one of {', '.join(judge_names())}")
        return name


@config_dataclass
class GRPOLossConfig:
    beta: Annotated[float, pydantic.Field(ge=0.0)] = 0.001  # KL weight (paper: 0.001)
    eps_low: Annotated[float, pydantic.Field(ge=0.0)] = 0.2
    eps_high: Annotated[float, pydantic.Field(ge=0.0)] | None = None  # clip-higher (DAPO: 0.28); None = eps_low
    aggregation: Literal["grpo", "token", "dr_grpo"] = "grpo"  # token: DAPO
    num_iterations: PositiveInt = 1  # policy updates per batch of rollouts


@config_dataclass
class GRPOLoopConfig:
    output_dir: str = "runs/grpo"
    max_steps: PositiveInt = 100
    problems_per_step: PositiveInt = 4
    group_size: Annotated[int, pydantic.Field(ge=2)] = 8  # K rollouts per problem
    rollout_batch_size: PositiveInt = 64  # sequences per generate call of the transformers rollout engine
    micro_batch_size: PositiveInt = 16  # completions per padded forward/backward pass of the update
    lr: Annotated[float, pydantic.Field(gt=0.0)] = 5e-7  # paper: AdamW, 5e-7
    weight_decay: Annotated[float, pydantic.Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, pydantic.Field(gt=0.0)] | None = 1.0
    seed: int = 0
    checkpoint_every: Annotated[int, pydantic.Field(ge=0)] = 50  # 0 = only when interrupted
    keep_checkpoints: PositiveInt = 2
    resume: str | None = None  # "latest" (this output_dir's newest checkpoint) or a checkpoint folder
    overwrite: bool = False  # start over in an output_dir that holds another run (removes its checkpoints)


@config_dataclass
class GRPOTrainConfig:
    stage: Literal["grpo"] = "grpo"
    policy: VLMConfig = field(default_factory=lambda: VLMConfig(do_sample=True, temperature=1.0,
                                                                max_new_tokens=256))
    rollout_backend: Literal["transformers", "vllm"] = "transformers"  # vllm: weights synced after every update
    lora_rank: Annotated[int, pydantic.Field(ge=0)] = 0  # 0 = full fine-tuning
    lora_alpha: PositiveInt = 16
    problems: str = ""  # JSONL of problems (thinkdiff.grpo.problems)
    limit: PositiveInt | None = None
    reward: RareRewardConfig = field(default_factory=RareRewardConfig)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    train: GRPOLoopConfig = field(default_factory=GRPOLoopConfig)


@config_dataclass
class AdditionTaskConfig:
    """thinkdiff.grpo.rare_task.AdditionTask: the collapse experiment's two-strategy task."""

    hard: Fraction = 0.2  # share of pairs the common strategy (recall) gets wrong (all with sums below 10)
    hard_error: int = 2  # what recall adds to the sum on those pairs (>= 2: no +-1 slip lands on the right sum)
    recall_share: Fraction = 0.85  # share of recall traces in the supervised data (the rest: count)
    recall_slip: Fraction = 0.03  # chance a recall trace is off by one
    count_slip: Fraction = 0.04  # chance per counting step of a +2 step
    count_skips_ten: bool = True  # counting never says ten: right only on sums below 10
    heldout: Fraction = 1 / 3  # share of pairs kept out of GRPO for evaluation
    seed: int = 0


@config_dataclass
class SupervisedConfig:
    """The base policy: a text Llama trained from nothing on the task's traces (thinkdiff.grpo.base_policy)."""

    steps: PositiveInt = 400
    batch_size: PositiveInt = 64
    lr: Annotated[float, pydantic.Field(gt=0.0)] = 3e-3
    hidden_size: PositiveInt = 128
    layers: PositiveInt = 2
    seed: int = 0


@config_dataclass
class RareExperimentConfig:
    """`python -m thinkdiff rare-experiment`: base, plain GRPO and uniqueness GRPO from one base, several seeds."""

    task: AdditionTaskConfig = field(default_factory=AdditionTaskConfig)
    sft: SupervisedConfig = field(default_factory=SupervisedConfig)
    grpo: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)  # policy.model and problems are filled in
    alphas: list[Fraction] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # 0: plain GRPO
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_samples: PositiveInt = 64  # samples per held-out problem (pass@1..pass@n)
    quick: list[str] = field(default_factory=list)  # overrides that --quick applies


TrainConfig = AlignTrainConfig | GRPOTrainConfig
STAGES = {"align": AlignTrainConfig, "grpo": GRPOTrainConfig}


def load_training_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A training config: `AlignTrainConfig` or `GRPOTrainConfig`, as its `stage` key says (default align)."""
    data = apply_overrides(read_yaml(path), list(overrides))
    stage = data.get("stage", "align")
    if stage not in STAGES:
        raise ConfigError(f"{path}: stage={stage!r}: choose one of {', '.join(STAGES)}.")
    return from_dict(STAGES[stage], data, str(path))
