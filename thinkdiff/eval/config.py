"""The `eval-cobsat` config: the inference sections (`vlm`, `aligner`, `decoder`, `seed`) plus `cobsat` and `judge`.

Every key can be overridden as `key.sub=value` (`cobsat.n=50`, `judge.kind=oracle`, `decoder.num_inference_steps=4`).
"""

from __future__ import annotations

import typing
from dataclasses import field
from typing import Annotated, Literal

import pydantic

from ..config import (
    AlignerSection,
    DecoderConfig,
    Dtype,
    Fraction,
    InferenceConfig,
    PositiveInt,
    VLMConfig,
    config_dataclass,
)
from .cobsat import MAX_SHOT, NUM_PROMPTS

Method = Literal["thinkdiff", "text-bridge", "oracle", "random"]
JudgeKind = Literal["engine", "transformers", "oracle", "cnn"]
METHODS = typing.get_args(Method)
JUDGE_KINDS = typing.get_args(JudgeKind)


@config_dataclass
class CobsatSection:
    root: str | None = None  # a folder with CoBSAT's datasets/ (or a mini-CoBSAT)
    shots: Annotated[list[Annotated[int, pydantic.Field(ge=1, le=MAX_SHOT)]], pydantic.Field(min_length=1)] = field(
        default_factory=lambda: [2, 4])  # ThinkDiff ran 2 and 4 (CoBSAT: 2 4 6 8)
    tasks: Annotated[list[Annotated[int, pydantic.Field(ge=1, le=10)]], pydantic.Field(min_length=1)] = field(
        default_factory=lambda: list(range(1, 11)))
    n: Annotated[int, pydantic.Field(ge=1, le=NUM_PROMPTS)] = NUM_PROMPTS  # samples per task and shot (CoBSAT: 1000)
    method: Method = "thinkdiff"
    # thinkdiff ("Word i: x, " + ThinkDiff's question) | cobsat ("x: <img>...")
    formatter: Literal["thinkdiff", "cobsat"] = "thinkdiff"
    instruction: str | None = None  # None = the formatter's own (ThinkDiff's question / CoBSAT's "")
    instruction_suffix: str = ""  # appended after the last word (CoBSAT's instruction[1])
    vision_ids: bool = False  # "Picture i: " before each image (Qwen2-VL's add_vision_id=True, ThinkDiff's run)
    batch_size: PositiveInt = 8  # samples per VLM batch and per judge batch
    model_name: str | None = None  # results/exps/{model_name}_image/...; None = the method's name
    # PIL's default, what CoBSAT's `img.save(save_path + ".jpg")` writes
    jpeg_quality: Annotated[int, pydantic.Field(ge=1, le=100)] = 75
    sheets: bool = True  # a PNG per shot and task
    sheet_rows: PositiveInt = 8
    retry_errors: bool = True  # a re-run retries samples whose record holds an error


@config_dataclass
class JudgeConfig:
    # engine (our VLM engines) | transformers (LLaVA-1.5 and other image-text-to-text) | oracle | cnn (the
    # miniature's drawing classifier, thinkdiff.mini.judge; `model` is its folder)
    kind: JudgeKind = "engine"
    model: str = "tiny:mllama"  # engine/transformers: model reference (folder, cached repo id, tiny:KIND)
    backend: Literal["transformers", "vllm", "remote"] = "transformers"  # engine
    # transformers: llava_v1 (CoBSAT's LLaVA conversation) | chat (processor template)
    template: Literal["llava_v1", "chat"] = "llava_v1"
    dtype: Dtype = "float32"
    device: str = "cpu"
    max_new_tokens: PositiveInt = 512  # CoBSAT: 512, temperature 0, one beam
    system: str | None = None  # engine: system prompt (CoBSAT's LLaVA judge has none beyond its conversation)
    batch_size: PositiveInt = 8
    flip_prob: Fraction = 0.0  # oracle: probability of a wrong answer
    reply: str = "{n}"  # oracle: reply template ({n} option number, {word} its label), e.g. "The answer is ({n})."
    seed: int = 0  # oracle: flip randomness


@config_dataclass
class CobsatEvalConfig:
    # No system message by default: Qwen2-VL's template adds ThinkDiff's "You are a helpful assistant." itself, and
    # Llama-3.2-Vision's refuses one next to images.
    vlm: VLMConfig = field(default_factory=VLMConfig)
    aligner: AlignerSection = field(default_factory=AlignerSection)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    seed: int = 42  # ThinkDiff re-seeds every image with run.seed (42)
    cobsat: CobsatSection = field(default_factory=CobsatSection)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def inference_config(self) -> InferenceConfig:
        return InferenceConfig(vlm=self.vlm, aligner=self.aligner, decoder=self.decoder, seed=self.seed)
