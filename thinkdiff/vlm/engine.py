"""The `HiddenStateEngine` interface: a VLM that answers prompts and returns layer-L hidden states.

Layer indices follow transformers' `output_hidden_states` convention, for a text decoder with N layers:

    0        the input of the first decoder layer (token embeddings; for Qwen2-VL with image features merged in)
    k        the output of decoder layer k, 1 <= k < N
    N        the final-normed state (what the LM head reads; ThinkDiff's "model.norm")
    -i       counts from the end, so -1 == N

A Mllama cross-attention layer that does not run (text-only prompt) passes its input through unchanged.

For one request the engine returns `input_embed[L]` [prompt_len, H], the states at the prompt positions, and
`output_embed[L]` [gen_len, H], where row j is the state at the position where generated token j is the *input*
(so row j has seen tokens 0..j of the answer). Both equal one plain forward pass over prompt + generated tokens.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import ConfigError, InputError

# Passed to every chat template. Llama-3's templates print "Today Date: <date_string>" (today's date by default) in
# the system block, so a prompt, and every hidden state, would change with the calendar; this is the templates' own
# fallback date. Templates that do not use it ignore it.
CHAT_TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}

MLLAMA_SYSTEM_ERROR = ("Llama-3.2-Vision's chat template refuses a system message next to images (\"Prompting with "
                       "images is incompatible with system messages\": the model was not tuned with both). Put the "
                       "instruction into the prompt and leave vlm.system unset, or use the model without images "
                       "(vlm.max_images=0).")

IMAGE_MARKER = "<image>"
"""Where an image goes inside a prompt. Without markers, all images come before the text."""


@dataclass
class VLMRequest:
    """One prompt. `images` keep their order; `<image>` markers in `prompt` place them inside the text."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    system: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("The prompt is empty: give the VLM a question or instruction.")
        n_markers = self.prompt.count(IMAGE_MARKER)
        if n_markers and n_markers != len(self.images):
            raise InputError(f"The prompt has {n_markers} {IMAGE_MARKER} markers but {len(self.images)} images "
                             "were given; use one marker per image, or none to put all images first.")

    def chat_messages(self) -> list[dict]:
        """The request as chat messages in transformers' multimodal content format."""
        if self.prompt.count(IMAGE_MARKER):
            content = []
            for i, piece in enumerate(re.split(re.escape(IMAGE_MARKER), self.prompt)):
                if i:
                    content.append({"type": "image"})
                if piece:
                    content.append({"type": "text", "text": piece})
        else:
            content = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.prompt}]
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": content}]


@dataclass
class SamplingConfig:
    """How answers are generated. Greedy by default; `seed` makes sampling reproducible: request i of a call
    samples with the generator keyed by (seed, first_index + i), so a call can stand for requests first_index...
    of a larger one (GRPO's processes each sample their share of the step's requests)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    first_index: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}.")


@dataclass
class HiddenStates:
    """What the engine returns for one request. Tensors are float32 on CPU unless the engine says otherwise."""

    prompt_token_ids: torch.Tensor  # [prompt_len] int64
    output_token_ids: torch.Tensor  # [gen_len] int64
    text: str  # the decoded answer, special tokens removed
    input_embed: dict[int, torch.Tensor]  # layer -> [prompt_len, H]
    output_embed: dict[int, torch.Tensor]  # layer -> [gen_len, H]

    def embed(self, layer: int, kind: str = "output") -> torch.Tensor:
        """The states ThinkDiff feeds its aligner: "output" [gen_len, H], "input" [prompt_len, H], "both", or
        "predicting" [gen_len, H]: row j is the state that *predicted* answer token j (the last prompt row, then
        output rows 0..gen_len-2), which is what ThinkDiff's vLLM fork returned as output_embed, so released
        ThinkDiff aligners see the inputs they were trained on."""
        if kind == "output":
            return self.output_embed[layer]
        if kind == "predicting":
            return torch.cat([self.input_embed[layer][-1:], self.output_embed[layer][:-1]], dim=0)
        if kind == "input":
            return self.input_embed[layer]
        if kind == "both":
            return torch.cat([self.input_embed[layer], self.output_embed[layer]], dim=0)
        raise ConfigError(f"Unknown embed kind {kind!r}; choose 'output', 'input', 'both' or 'predicting'.")


def end_token_ids(model_path, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's eos ids and the tokenizer's eos token (vLLM stops on
    both; transformers is given the same set)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError(f"The model at {model_path} names no end-of-sequence token (generation_config.json or the "
                         "tokenizer's eos_token); answers could not end.")
    return ids


def answer_sentinel(tokenizer, vocab_size: int, end_ids: set[int]) -> int:
    """A token no answer contains: the pad token, or else the highest special token the LM head can produce that
    ends nothing. The vLLM engine stops on it after an end token (vllm_answer_end.py); both engines suppress it."""
    candidates = [tokenizer.pad_token_id] + sorted(tokenizer.all_special_ids, reverse=True)
    for token in candidates:
        if token is not None and token < vocab_size and token not in end_ids:
            return token
    raise ConfigError("The tokenizer has no special token outside the end tokens that could mark a finished answer; "
                     "give it a pad token.")


def vision_token_ids(config) -> list[int]:
    """Image placeholders and vision delimiters of a model's config that its LM head can produce (Qwen2-VL's image,
    video and vision start/end tokens; Mllama's <|image|> lies past its LM head). Sampling never draws them in either
    engine: a sampled answer holding one cannot be fed back to the model (Qwen2-VL counts placeholders against image
    features), as GRPO's update does; greedy decoding is left as it is."""
    names = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vocab = config.get_text_config().vocab_size
    ids = (getattr(config, name, None) for name in names)
    return sorted({i for i in ids if isinstance(i, int) and i < vocab})


class HiddenStateEngine(abc.ABC):
    """A VLM that generates answers and returns hidden states of requested layers (see module docstring)."""

    num_layers: int  # N, the number of text decoder layers; valid layer indices are 0..N and -(N+1)..-1
    hidden_size: int  # H
    max_images: int | None  # images per request the model supports (None: no fixed limit)
    context_length: int | None = None  # most tokens of prompt + answer the model takes (None: not known)

    def prompt_counter(self) -> Callable[[VLMRequest], int] | None:
        """A function giving a request's prompt length in tokens (chat template and image tokens included) that
        may run in another thread while the engine generates (a server checks requests with it before queueing
        them); None when this engine cannot tell."""
        return None

    def continuous_batcher(self):
        """For a server: an object that takes over this engine and runs calls in one continuously refilled batch
        (`submit(requests, layers, sampling) -> Future`, `cancel(future)`, `running`, `close()`), or None when
        this engine runs one call at a time."""
        return None

    @abc.abstractmethod
    def generate(self, requests: list[VLMRequest], layers: list[int], sampling: SamplingConfig | None = None,
                 progress: bool = True) -> list[HiddenStates]:
        """Answer every request (batched) and return its hidden states at `layers`, in request order. With no
        layers only the answers are computed (rollouts, judges). `progress`: show progress bars."""

    def resolve_layers(self, layers: list[int]) -> list[int]:
        """Map negative indices to 0..N and reject out-of-range ones with the valid range in the message."""
        resolved = []
        for layer in layers:
            if not -(self.num_layers + 1) <= layer <= self.num_layers:
                raise ConfigError(f"Layer {layer} is out of range: this model has {self.num_layers} decoder layers, "
                                 f"so valid layers are 0..{self.num_layers} (or -{self.num_layers + 1}..-1); "
                                 f"{self.num_layers} is the final-normed state.")
            resolved.append(layer % (self.num_layers + 1))
        return list(dict.fromkeys(resolved))

    def check_requests(self, requests: list[VLMRequest]) -> None:
        if not requests:
            raise InputError("No requests given.")
        for i, request in enumerate(requests):
            if getattr(self, "family", None) == "mllama" and request.system and request.images:
                raise InputError(f"Request {i}: {MLLAMA_SYSTEM_ERROR}")
            if self.max_images is not None and len(request.images) > self.max_images:
                raise InputError(f"Request {i} has {len(request.images)} images but this model supports at most "
                                 f"{self.max_images} per request.")
