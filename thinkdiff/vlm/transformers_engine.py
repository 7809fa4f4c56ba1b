"""The reference `HiddenStateEngine`: plain transformers `generate`, then one forward pass with layer hooks.

Generation is batched (left padding). States are then taken from one unpadded forward pass per request over
prompt + generated tokens, so they are exactly what a plain transformers forward pass gives.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.generation.streamers import BaseStreamer

from ..errors import ConfigError
from ..rng import generator
from .engine import (
    CHAT_TEMPLATE_KWARGS,
    HiddenStateEngine,
    HiddenStates,
    SamplingConfig,
    VLMRequest,
    answer_sentinel,
    end_token_ids,
    vision_token_ids,
)

logger = logging.getLogger(__name__)


def model_family(config) -> str:
    """'mllama', 'qwen2-vl' (Qwen2-VL and Qwen2.5-VL) or 'text' (any causal LM)."""
    model_type = getattr(config, "model_type", "")
    if model_type == "mllama":
        return "mllama"
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return "qwen2-vl"
    if hasattr(config, "vision_config"):
        raise ConfigError(f"VLM type {model_type!r} is not supported yet; supported: mllama, qwen2_vl, qwen2_5_vl, "
                         "and text-only causal LMs.")
    return "text"


def load_model(model_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The transformers model in `model_path`: a causal LM, or an image-text-to-text model for VLMs."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    family = model_family(AutoConfig.from_pretrained(str(model_path)))
    auto = AutoModelForCausalLM if family == "text" else AutoModelForImageTextToText
    return auto.from_pretrained(str(model_path), dtype=dtype).to(device)


class TransformersEngine(HiddenStateEngine):
    """Hidden states from a transformers model loaded from `model_path` (a local folder).

    `model`: run this already loaded model of `model_path` instead (e.g. a policy being trained, with LoRA adapters);
    the engine reads it and never changes it."""

    def __init__(self, model_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 max_images: int | None = None, batch_size: int = 8, model: torch.nn.Module | None = None):
        self.model_path = str(model_path)
        self.family = model_family(AutoConfig.from_pretrained(self.model_path))
        self.model = load_model(self.model_path, dtype, device).eval() if model is None else model
        self.device = torch.device(device)
        self.processor = _load_processor(self.model_path, self.family)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.decoder = self.model.get_decoder()
        self.num_layers = len(self.decoder.layers)
        self.hidden_size = self.decoder.config.hidden_size
        self.context_length = getattr(self.decoder.config, "max_position_embeddings", None)
        self.max_images = 0 if self.family == "text" else max_images
        self.batch_size = batch_size
        self.eos_token_ids = end_token_ids(self.model_path, self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = min(self.eos_token_ids)
        # Never generated, as in the vLLM engine, which ends answers with it (engine.answer_sentinel).
        self.sentinel = answer_sentinel(self.tokenizer, self.decoder.config.vocab_size, self.eos_token_ids)
        self.vision_token_ids = vision_token_ids(self.model.config)  # never sampled

    # ------------------------------------------------------------------------------------------- public

    @torch.no_grad()
    def generate(self, requests: list[VLMRequest], layers: list[int], sampling: SamplingConfig | None = None,
                 progress: bool = True) -> list[HiddenStates]:
        sampling = sampling or SamplingConfig()
        layers = self.resolve_layers(layers)
        self.check_requests(requests)
        answers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Mllama's processor cannot mix requests with and without images in one batch.
        groups = [[i for i, r in enumerate(requests) if bool(r.images) == has] for has in (True, False)]
        chunks = [g[s:s + self.batch_size] for g in groups for s in range(0, len(g), self.batch_size)]
        for chunk in tqdm(chunks, desc="VLM batches", unit="batch", disable=len(chunks) < 2 or not progress):
            for i, answer in zip(chunk, self._generate_batch([requests[i] for i in chunk], chunk, sampling,
                                                             progress)):
                answers[i] = answer
        results = []
        for i, request in enumerate(tqdm(requests, desc="VLM hidden states", unit="req",
                                         disable=len(requests) < 2 or not progress)):
            prompt_ids, output_ids = answers[i]
            states = self._states(request, prompt_ids, output_ids, layers) if layers else {}
            p = len(prompt_ids)
            results.append(HiddenStates(
                prompt_token_ids=prompt_ids, output_token_ids=output_ids,
                text=self.tokenizer.decode(output_ids, skip_special_tokens=True),
                input_embed={k: s[:p] for k, s in states.items()},
                output_embed={k: s[p:] for k, s in states.items()}))
        return results

    def prompt_counter(self) -> PromptCounter:
        return PromptCounter(self.model_path, self.family)

    # ------------------------------------------------------------------------------------------ helpers

    def chat_text(self, request: VLMRequest) -> str:
        return self.processor.apply_chat_template(request.chat_messages(), tokenize=False,
                                                  add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS)

    def encode(self, requests: list[VLMRequest]):
        """Processor outputs for a batch (left-padded), on the engine's device. Each distinct text is rendered and,
        without images, tokenised once (a GRPO group repeats one prompt K times)."""
        position, distinct = {}, []  # (system, prompt, image count) -> its index in `distinct`, the rendered texts
        for r in requests:
            key = (r.system, r.prompt, len(r.images))
            if key not in position:
                position[key] = len(distinct)
                distinct.append(self.chat_text(r))
        rows = [position[(r.system, r.prompt, len(r.images))] for r in requests]
        kwargs = dict(padding=True, return_tensors="pt", add_special_tokens=False)
        if not any(r.images for r in requests):
            enc = self.processor(distinct, **kwargs) if self.family == "text" else \
                self.processor(text=distinct, **kwargs)
            for name, value in enc.items():
                enc[name] = value[torch.tensor(rows)]
        elif self.family == "mllama":
            enc = self.processor(text=[distinct[i] for i in rows], images=[r.images for r in requests], **kwargs)
        else:
            enc = self.processor(text=[distinct[i] for i in rows], images=[im for r in requests for im in r.images],
                                 **kwargs)
        enc = enc.to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    def _generate_batch(self, requests: list[VLMRequest], indices: list[int], sampling: SamplingConfig,
                        progress: bool):
        """Answers for `requests`, which are requests `indices` of the call (their sampling generators' keys)."""
        from transformers import LogitsProcessorList

        enc = self.encode(requests)
        # Sampling is done by `PerRequestSampler` (one generator per request), so generate itself runs greedy.
        suppressed = [self.sentinel, *(self.vision_token_ids if sampling.do_sample else [])]
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
                      do_sample=False, pad_token_id=self.pad_token_id, eos_token_id=sorted(self.eos_token_ids),
                      suppress_tokens=suppressed, temperature=None, top_p=None, top_k=None)
        if sampling.do_sample:
            kwargs["logits_processor"] = LogitsProcessorList([PerRequestSampler(
                [generator(sampling.seed, sampling.first_index + i, self.device) if sampling.seed is not None else None
                 for i in indices],
                sampling.temperature, sampling.top_p, block=sampling.max_new_tokens)])
        with tqdm(total=sampling.max_new_tokens, desc="VLM generate", unit="tok", leave=False,
                  disable=not progress) as bar:
            sequences = self.model.generate(**enc, **kwargs, streamer=_TokenProgress(bar))
        padded_len = enc["input_ids"].shape[1]
        answers = []
        for row in range(len(requests)):
            prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].cpu()
            new = sequences[row, padded_len:].cpu().tolist()
            end = next((j + 1 for j, t in enumerate(new) if t in self.eos_token_ids), len(new))
            answers.append((prompt_ids, torch.tensor(new[:end], dtype=torch.long)))
        return answers

    def forward_inputs(self, request: VLMRequest, output_ids: torch.Tensor) -> dict:
        """Model inputs for one unpadded forward pass over the prompt + `output_ids`."""
        return self.batch_forward_inputs([request], [output_ids])

    def batch_forward_inputs(self, requests: list[VLMRequest], outputs: list[torch.Tensor]) -> dict:
        """Model inputs for one forward pass over B prompts + their output ids: prompts left-padded as `generate`
        pads them, outputs right-padded after them, so row b's prompt ends at column `input_ids.shape[1] -
        max(len(outputs))` for every b. Position ids count real tokens only (Qwen2-VL derives its own from the
        mask), so each row's logits equal its unpadded pass. Requests with and without images cannot share a
        batch (Mllama's processor)."""
        enc = dict(self.encode(requests))
        width = max(len(o) for o in outputs)
        ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        out_mask = torch.zeros(len(requests), width, dtype=enc["attention_mask"].dtype)
        for row, o in enumerate(outputs):
            ids[row, :len(o)], out_mask[row, :len(o)] = o, 1
        enc["input_ids"] = torch.cat([enc["input_ids"], ids.to(self.device)], dim=1)
        enc["attention_mask"] = torch.cat([enc["attention_mask"], out_mask.to(self.device)], dim=1)
        if self.family != "qwen2-vl":
            enc["position_ids"] = (enc["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        if "mm_token_type_ids" in enc:  # generated tokens are text
            types = enc["mm_token_type_ids"]
            enc["mm_token_type_ids"] = torch.cat([types, types.new_zeros(len(requests), width)], dim=1)
        if "cross_attention_mask" in enc:  # generated tokens see what the last prompt token sees (as in generate)
            mask = enc["cross_attention_mask"]
            enc["cross_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, width, -1, -1)], 1)
        return enc

    def _states(self, request, prompt_ids, output_ids, layers) -> dict[int, torch.Tensor]:
        enc = self.forward_inputs(request, output_ids)
        if not torch.equal(enc["input_ids"][0, :len(prompt_ids)].cpu(), prompt_ids):
            raise RuntimeError("Prompt tokens differ between batched and single encoding; please report this.")
        with capture_layers(self.decoder, layers) as captured:
            self.model(**enc, use_cache=False, logits_to_keep=1)
        return {k: v[0].float().cpu() for k, v in captured.items()}


class PerRequestSampler:
    """A transformers logits processor that samples row r with its own generator (temperature, then top-p) and
    leaves only the drawn token finite, so greedy decoding picks it. A request's answer then depends on its own
    generator alone: not on the batch size, the chunking or the other requests of the call."""

    def __init__(self, generators: list[torch.Generator | None], temperature: float = 1.0, top_p: float = 1.0,
                 block: int = 16):
        from transformers import TopPLogitsWarper

        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}.")
        self.generators, self.temperature = generators, temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        # Each row's uniform draws, `block` tokens at a time: torch.rand(n, generator=g) is the same stream as n
        # calls of torch.rand(1, generator=g), one call per row instead of one per row and token.
        self.block, self.draws, self.used = block, None, 0

    def next_draws(self, device) -> torch.Tensor:
        """The next uniform draw of every row: [B]."""
        if self.draws is None or self.used == self.draws.shape[1]:
            self.draws = torch.stack([torch.rand(self.block, generator=g, device=device) for g in self.generators])
            self.used = 0
        self.used += 1
        return self.draws[:, self.used - 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        # Inverse-CDF sampling: one uniform draw per row from the row's own generator, then one batched lookup
        # (a row's token is the first whose cumulative probability exceeds its draw; zero-probability tokens never
        # are). One `torch.multinomial` per row and token cost 8x more on CPU for 64 rows.
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        draws = self.next_draws(scores.device)
        tokens = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
        tokens = tokens.clamp_max(scores.shape[-1] - 1)
        chosen = torch.full_like(scores, -float("inf"))
        chosen[torch.arange(len(tokens), device=scores.device), tokens] = 0.0
        return chosen


class _TokenProgress(BaseStreamer):
    """A transformers streamer that advances a progress bar once per generated token (the first call is the prompt)."""

    def __init__(self, bar):
        super().__init__()
        self.bar, self.prompt_seen = bar, False

    def put(self, value):
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self):
        pass


@contextmanager
def capture_layers(decoder: torch.nn.Module, layers: list[int]):
    """Hooks on a text decoder (`.layers`, `.norm`) that fill a dict layer -> [B, T, H] during one forward pass.

    Layer 0 is the input of the first decoder layer, k the output of layer k, N the output of the final norm.
    A layer that was skipped (Mllama cross-attention without images) passes on its input unchanged.
    """
    blocks = list(decoder.layers)
    n = len(blocks)
    seen: dict[int, torch.Tensor] = {}  # layer index -> state after that many layers (0 = input)
    captured: dict[int, torch.Tensor] = {}

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def pre_hook(module, args, kwargs):
        seen[0] = first(args) if args else kwargs["hidden_states"]

    def make_hook(k):
        def hook(module, args, output):
            seen[k] = first(output)
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [block.register_forward_hook(make_hook(k + 1)) for k, block in enumerate(blocks[:-1])]
    handles.append(decoder.norm.register_forward_hook(make_hook(n)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        k = layer
        while k not in seen:  # skipped layers are the identity
            k -= 1
        captured[layer] = seen[k]


class PromptCounter:
    """Prompt lengths in tokens, as the engines' processors make them, with a processor of its own (the engine's
    may be busy generating; one lock makes it safe to call from many threads)."""

    def __init__(self, model_path: str, family: str):
        self.family = family
        self.processor = _load_processor(model_path, family)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.lock = threading.Lock()

    def __call__(self, request: VLMRequest) -> int:
        with self.lock:
            text = self.processor.apply_chat_template(request.chat_messages(), tokenize=False,
                                                      add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS)
            if self.family == "qwen2-vl" and request.images:  # each image's one <|image_pad|> grows to its patches
                enc = self.processor(text=[text], images=list(request.images), return_tensors="pt")
                return int(enc["input_ids"].shape[1])
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _load_processor(path: str, family: str):
    from transformers import AutoProcessor, AutoTokenizer

    if family == "text":
        return AutoTokenizer.from_pretrained(path)
    if family == "qwen2-vl":
        # AutoProcessor also builds Qwen2-VL's video processor, which needs torchvision; images need only PIL.
        try:
            return AutoProcessor.from_pretrained(path)
        except ImportError as err:
            logger.info("Qwen2-VL processor without video support (%s)", str(err).strip().splitlines()[0])
            return Qwen2VLImageTextProcessor(path)
    return AutoProcessor.from_pretrained(path)


class Qwen2VLImageTextProcessor:
    """Qwen2-VL's processor for text and images only (no torchvision), as transformers' `Qwen2VLProcessor` does it:
    each `<|image_pad|>` becomes grid_t * grid_h * grid_w / merge_size**2 copies of itself."""

    image_token = "<|image_pad|>"

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    def __call__(self, text: list[str], images=None, **kwargs):
        from transformers import BatchFeature

        image_inputs = {}
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = (image_inputs["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            counts.reverse()
            expanded = []
            for t in text:
                pieces = t.split(self.image_token)
                out = pieces[0]
                for piece in pieces[1:]:
                    out += "<|placeholder|>" * counts.pop() + piece
                expanded.append(out.replace("<|placeholder|>", self.image_token))
            text = expanded
        text_inputs = self.tokenizer(text, **kwargs)
        if images:  # modality of each token, which M-RoPE needs: 1 for image tokens, 0 for text
            image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            text_inputs["mm_token_type_ids"] = (text_inputs["input_ids"] == image_token_id).long()
        return BatchFeature({**text_inputs, **image_inputs})
