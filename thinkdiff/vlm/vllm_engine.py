"""The vLLM `HiddenStateEngine`: generation through vLLM, layer-L states from forward hooks on the text decoder.

Hooks on the text decoder (vllm_worker.py) record the residual stream of the requested layers for every row the
model computes while vLLM generates: prefill rows, then one row per decode step (decode-time states equal prefill
states, 0.0 in float32). Every row of prompt + generated tokens (the contract in engine.py) is covered this way:

* The engine asks vLLM for one token more than `max_new_tokens` and drops it: the step that samples it computes the
  row of the last kept token. An answer that fills max_model_len likewise keeps one token fewer than vLLM made.
  An answer that ends at an end-of-sequence token runs one step more: requests run with `ignore_eos` and a logits
  processor (vllm_answer_end.py) that forces a sentinel token right after an end token and stops on it, so the end
  token's row is computed while generating, in the same batch, and no prefill pass follows.
* Rows the prefix cache skipped while generating (requests of one call that share a prefix, e.g. GRPO's copies of
  a prompt) are taken from a request with the same tokens up to that row: a row depends on its token prefix only.
  The prefix cache is reset at the start of every call that asks for states (so every row of the call is computed
  in it), and after a weight update.

Sampling: request i of a call samples with vLLM's per-request seed `derive_seed(seed, i)`, so its answer does not
depend on the batch or on the other requests. On CPU, vLLM 0.32 cannot rewind a per-request generator after a chunked
prefill ("CPU Generator does not use offset"), so the engine turns chunked prefill off there and makes
`max_num_batched_tokens` at least `max_model_len`.

The states equal one plain forward pass over prompt + generated tokens within float32 noise, as the transformers
engine's do.

Requirements (vLLM 0.32.x, pinned: this touches internals): `enforce_eager=True` (hooks do not fire under
torch.compile), the synchronous scheduler (`async_scheduling=False`), vLLM's V1 model runner
(`VLLM_USE_V2_MODEL_RUNNER=0`, set by the engine), head size >= 32 on CPU. Mllama uses our
plugin (vllm_mllama.py) for images and text. Qwen2-VL in vLLM needs torchvision.

Hooks and weight sync run on vLLM's workers as a worker extension (vllm_worker.py), called by name through
`LLM.collective_rpc`. vLLM internals are read through vllm_compat.py only: each step's batch layout (request ids in
batch order, row bounds, tokens already computed), `reload_weights`, the cross-attention metadata. Internal request
ids are `f"{RequestOutput.request_id}-{8 random characters}"`; row j of request i is its token
`num_computed[i] + j` (M-RoPE positions are not token indices). Decoder layers are called as
`layer(positions, hidden_states, residual)` and return `(hidden, residual)`, whose sum is the residual stream
(vLLM's Llama/Qwen2 layers and our Mllama layers alike); layers of vLLM's Transformers backend are called as
`layer(hidden_states [1, T, H], ...)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, MissingDependencyError
from ..rng import derive_seed
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
from .transformers_engine import PromptCounter, _load_processor, model_family
from .vllm_compat import check_version
from .vllm_worker import WORKER_EXTENSION

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 8
# Prompt tokens a request may have by default (text and image placeholder tokens); max_model_len adds the answer.
DEFAULT_PROMPT_TOKENS = 4096
# Attention head sizes vLLM 0.32's CPU attention backend runs (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# KV block size on CPU (the backend needs a multiple of 32; vLLM's CPU default is 128).
CPU_BLOCK_SIZE = 32
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # vLLM would take about half of the RAM


def _set_vllm_env(kv_cache_gib: float | None) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: fast start, shared memory
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the hooks and our Mllama plugin use the V1 runner
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results (extract's answer)
    if kv_cache_gib is not None:  # CPU KV cache (GiB); vLLM reads it when the engine starts
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{DEFAULT_CPU_KV_CACHE_GIB:g}")


def mm_tokens_per_request(hf_config, family: str, max_images: int) -> int:
    """Encoder tokens of the largest request's images (Mllama: every image with every tile), 0 for text."""
    if family != "mllama" or not max_images:
        return 0
    vision = hf_config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
    return max_images * vision.max_num_tiles * per_tile


def engine_limits(hf_config, family: str, max_images: int, max_new_tokens: int, on_cpu: bool,
                  max_model_len: int | None = None, max_num_batched_tokens: int | None = None) -> dict:
    """vLLM's `max_model_len` and `max_num_batched_tokens` for requests of up to DEFAULT_PROMPT_TOKENS prompt tokens
    and `max_new_tokens` answer tokens (+1: the engine asks for one more), unless given. The token budget of a step
    holds the largest request's images (vLLM does not split one image item over steps) and, on CPU, where chunked
    prefill is off, a whole prompt."""
    model_max = hf_config.get_text_config().max_position_embeddings
    if max_model_len is None:
        max_model_len = min(model_max, DEFAULT_PROMPT_TOKENS + max_new_tokens + 1)
    elif max_model_len > model_max:
        raise ConfigError(f"vlm.max_model_len={max_model_len} exceeds the model's {model_max} positions.")
    mm_tokens = mm_tokens_per_request(hf_config, family, max_images)
    needed = max(mm_tokens, max_model_len if on_cpu else 0)
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(needed, 8192)
    elif max_num_batched_tokens < needed:
        why = (f"{max_images} images of up to {hf_config.vision_config.max_num_tiles} tiles take {mm_tokens} encoder "
               "tokens, which vLLM schedules in one step" if mm_tokens >= needed else
               f"on CPU chunked prefill is off, so a whole prompt (max_model_len={max_model_len}) must fit one step")
        raise ConfigError(f"vlm.max_num_batched_tokens={max_num_batched_tokens} is too small: {why}; use at least "
                         f"{needed}, or lower vlm.max_images / vlm.max_model_len.")
    return {"max_model_len": max_model_len, "max_num_batched_tokens": max_num_batched_tokens}


def device_environment(device: str | None, visible: str | None) -> dict[str, str]:
    """Environment for a vLLM engine that must run on `device` (e.g. "cuda:1"): vLLM's single-GPU worker always
    takes the first visible GPU, so the engine core runs in its own process that sees only that GPU. `visible`:
    this process's CUDA_VISIBLE_DEVICES. Empty for the default device."""
    if device is None or torch.device(device).type != "cuda" or not torch.device(device).index:
        return {}
    index = torch.device(device).index
    ids = visible.split(",") if visible else [str(i) for i in range(index + 1)]
    if index >= len(ids):
        raise ConfigError(f"vlm.device={device}: only {len(ids)} GPUs are visible (CUDA_VISIBLE_DEVICES={visible}).")
    return {"CUDA_VISIBLE_DEVICES": ids[index], "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine(HiddenStateEngine):
    def __init__(self, model_path: str | Path, dtype: torch.dtype = torch.float32, max_images: int | None = None,
                 batch_size: int | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, max_new_tokens: int = 128,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 kv_cache_gib: float | None = None, device: str | None = None, seed: int = 0, **llm_kwargs):
        """`batch_size`: the most sequences vLLM runs at once (`max_num_seqs`; vLLM's default when None).
        `max_model_len` / `max_num_batched_tokens`: derived from the model and `max_new_tokens` when None (see
        `engine_limits`). `gpu_memory_utilization`: the share of the GPU vLLM takes (vLLM's 0.9 when None).
        `kv_cache_gib`: the KV cache size (CPU: VLLM_CPU_KVCACHE_SPACE, default 1; GPU: instead of
        gpu_memory_utilization). `device`: a GPU other than the first runs the engine core in its own process
        (`device_environment`). `llm_kwargs` go to `vllm.LLM` and override the engine's choices."""
        _set_vllm_env(kv_cache_gib)
        import vllm
        from transformers import AutoConfig

        check_version()
        from vllm.platforms import current_platform

        from .vllm_answer_end import FQCN

        on_cpu = current_platform.is_cpu()
        self.model_path = str(model_path)
        config = AutoConfig.from_pretrained(self.model_path)
        self.family = model_family(config)
        text_config = config.get_text_config()
        self.num_layers, self.hidden_size = text_config.num_hidden_layers, text_config.hidden_size
        head_size = getattr(text_config, "head_dim", None) or self.hidden_size // text_config.num_attention_heads
        if on_cpu and head_size not in CPU_HEAD_SIZES:
            raise ConfigError(f"This model's attention head size is {head_size}; vLLM's CPU backend runs head sizes "
                             f"{', '.join(map(str, CPU_HEAD_SIZES))} only. Use the transformers backend.")
        self.processor = _load_processor(self.model_path, self.family)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.end_ids = end_token_ids(self.model_path, self.tokenizer)
        self.sentinel = answer_sentinel(self.tokenizer, text_config.vocab_size, self.end_ids)
        self.vision_token_ids = vision_token_ids(config)  # never sampled
        if self.family == "text":
            self.max_images = 0
        else:
            self.max_images = DEFAULT_MAX_IMAGES if max_images is None else max_images
        # Mllama with images runs as an encoder-decoder model, for which vLLM has no prefix caching.
        encoder_decoder = self.family == "mllama" and bool(self.max_images)
        limits = engine_limits(config, self.family, self.max_images, max_new_tokens, on_cpu, max_model_len,
                               max_num_batched_tokens)
        # The hooks read each step's batch layout from the model runner: run the synchronous scheduler (the only
        # one verified, and vLLM's choice on CPU) rather than the async one vLLM picks on GPUs.
        kwargs = dict(enforce_eager=True, enable_prefix_caching=not encoder_decoder, async_scheduling=False,
                      worker_extension_cls=WORKER_EXTENSION,
                      dtype=str(dtype).replace("torch.", ""), seed=seed, logits_processors=[FQCN],
                      tensor_parallel_size=tensor_parallel_size, **limits)
        if on_cpu:  # per-request seeds cannot survive a chunked prefill on CPU (module docstring)
            kwargs["enable_chunked_prefill"] = False
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_gib is not None and not on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if batch_size is not None:
            kwargs["max_num_seqs"] = batch_size
        if on_cpu and not encoder_decoder:
            kwargs["block_size"] = CPU_BLOCK_SIZE
        if self.family != "text":
            kwargs["limit_mm_per_prompt"] = {"image": self.max_images}
        if self.family == "mllama":
            from .vllm_plugin import register

            register()  # in this process; the entry point registers it in engine processes
            if encoder_decoder:
                kwargs["hf_overrides"] = {"is_encoder_decoder": True}
        if self.family == "qwen2-vl":
            try:
                import torchvision  # noqa: F401
            except ImportError:
                raise MissingDependencyError("vLLM's Qwen2-VL needs torchvision (a CPU or CUDA build matching "
                                             "torch); use the transformers backend without it.") from None
        kwargs.update(llm_kwargs)
        with _environment(device_environment(device, os.environ.get("CUDA_VISIBLE_DEVICES"))):
            self.llm = vllm.LLM(model=self.model_path, **kwargs)
        self.prefix_caching = bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        self.max_model_len = self.llm.llm_engine.vllm_config.model_config.max_model_len
        self.context_length = self.max_model_len

    # ------------------------------------------------------------------------------------------- public

    def generate(self, requests: list[VLMRequest], layers: list[int], sampling: SamplingConfig | None = None,
                 progress: bool = True) -> list[HiddenStates]:
        sampling = sampling or SamplingConfig()
        layers = self.resolve_layers(layers)
        self.check_requests(requests)
        prompts = [self.checked_prompt_ids(r, i) for i, r in enumerate(requests)]
        params = [self.sampling_params(sampling, sampling.first_index + i, bool(layers)) for i in range(len(requests))]
        if layers:  # every row is computed in this call, so the hooks see it
            self._reset_prefix_cache()
            self.llm.collective_rpc("thinkdiff_install_hooks", args=(layers, self.num_layers))
        try:
            outputs = self.llm.generate([self.vllm_prompt(p, r) for p, r in zip(prompts, requests)], params,
                                        use_tqdm=progress and len(requests) > 1)
        finally:
            if layers:
                capture = self.llm.collective_rpc("thinkdiff_collect_hooks")[0]
        answers = [self.kept_answer(p, list(o.outputs[0].token_ids), sampling.max_new_tokens, bool(layers))
                   for p, o in zip(prompts, outputs)]
        if layers:
            sequences = [list(p) + a.tolist() for p, a in zip(prompts, answers)]
            states = _assemble(capture, sequences, _ids(outputs, range(len(requests))), layers, self.hidden_size)
        else:
            states = [{} for _ in requests]
        return [self.hidden_states(p, a, s) for p, a, s in zip(prompts, answers, states)]

    def checked_prompt_ids(self, request: VLMRequest, index: int) -> list[int]:
        ids = self.prompt_ids(request)
        if len(ids) + 1 >= self.max_model_len:
            raise ConfigError(f"Request {index} has {len(ids)} prompt tokens; vlm.max_model_len={self.max_model_len} "
                             "leaves no room for an answer. Shorten the prompt or raise vlm.max_model_len.")
        return ids

    def hidden_states(self, prompt: list[int], answer: torch.Tensor, state: dict[int, torch.Tensor]) -> HiddenStates:
        """One request's result from its prompt ids, kept answer and per layer [len(prompt + answer), H] rows."""
        p = len(prompt)
        return HiddenStates(prompt_token_ids=torch.tensor(prompt, dtype=torch.long), output_token_ids=answer,
                            text=self.tokenizer.decode(answer, skip_special_tokens=True),
                            input_embed={k: s[:p] for k, s in state.items()},
                            output_embed={k: s[p:] for k, s in state.items()})

    def sampling_params(self, sampling: SamplingConfig, index: int, states: bool):
        """vLLM's parameters for request `index` of a call (its own seed). With `states`, one token more than asked
        (dropped by `kept_answer`): the step that samples it computes the row of the last kept token. An answer that
        ends at an end token runs one step more, to the sentinel, so that step computes the end token's row
        (vllm_answer_end.py), which also keeps sampling off image placeholders and vision delimiters, as the
        transformers engine does. detokenize=False: answers are decoded with the tokenizer."""
        from vllm import SamplingParams

        from .vllm_answer_end import EXTRA_ARGS_KEY

        n = sampling.max_new_tokens
        end = {"end_ids": sorted(self.end_ids), "sentinel": self.sentinel, "force": states,
               "suppressed": self.vision_token_ids if sampling.do_sample else []}
        return SamplingParams(max_tokens=n + 1 if states else n, min_tokens=sampling.min_new_tokens,
                              temperature=sampling.temperature if sampling.do_sample else 0.0,
                              top_p=sampling.top_p if sampling.do_sample else 1.0,
                              seed=derive_seed(sampling.seed, index) if sampling.do_sample and sampling.seed is not None
                              else None,
                              ignore_eos=states, stop_token_ids=[self.sentinel] if states else None,
                              extra_args={EXTRA_ARGS_KEY: end}, detokenize=False)

    def kept_answer(self, prompt: list[int], generated: list[int], max_new_tokens: int, states: bool) -> torch.Tensor:
        """The answer's tokens out of what vLLM generated with `sampling_params`: with states, an ended answer
        closes with the sentinel (dropped); the others ran to n + 1 tokens, or to max_model_len, where the last row
        cannot be computed within the limit, so they keep one token fewer."""
        if states:
            if generated and generated[-1] == self.sentinel:
                kept = len(generated) - 1
            else:
                kept = min(max_new_tokens, len(generated) - 1 if len(prompt) + len(generated) >= self.max_model_len
                           else len(generated))
        else:
            kept = min(max_new_tokens, len(generated))
        return torch.tensor(generated[:kept], dtype=torch.long)

    def prompt_ids(self, request: VLMRequest) -> list[int]:
        """The prompt's token ids, as the transformers engine's processor makes them (one <|image|> per image)."""
        text = self.processor.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True,
                                                  **CHAT_TEMPLATE_KWARGS)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_counter(self) -> PromptCounter:
        return PromptCounter(self.model_path, self.family)

    def continuous_batcher(self):
        from .vllm_stream import VLLMStream

        return VLLMStream(self)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(name, tensor)` pairs, under the checkpoint's own names, into the served model (e.g. a policy's
        weights after an update). Tensors go to the workers as they are: in this process by reference, to an
        engine process through vLLM's tensor serialization."""
        self.llm.collective_rpc("thinkdiff_load_weights", args=(list(named_tensors),))
        self._reset_prefix_cache()  # cached KV belongs to the old weights

    def _reset_prefix_cache(self) -> None:
        if not self.prefix_caching:
            return
        block_pool_logger = logging.getLogger("vllm.v1.core.block_pool")  # logs every reset at INFO
        level = block_pool_logger.level
        block_pool_logger.setLevel(max(level, logging.WARNING))
        try:
            reset = self.llm.reset_prefix_cache()
        finally:
            block_pool_logger.setLevel(level)
        if not reset:
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?).")

    @staticmethod
    def vllm_prompt(ids, request: VLMRequest) -> dict:
        prompt = {"prompt_token_ids": list(ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt


def _ids(outputs, requests) -> dict[str, int]:
    """vLLM's request id -> our request index, for `outputs` of `requests` (indices, in order)."""
    return {o.request_id: i for o, i in zip(outputs, requests, strict=True)}


def _assemble(capture, sequences: list[list[int]], index: dict[str, int], layers: list[int],
              hidden_size: int) -> list[dict[int, torch.Tensor]]:
    """Per request, layer -> [len(sequence), H]: the captured rows put at their token positions (`index` maps
    vLLM's request ids to requests); rows no step of this request computed (prefix-cache hits) come from a request
    whose tokens agree up to and including them."""
    if capture["missing"]:
        raise RuntimeError(f"vLLM ran a step in which layers {capture['missing']} were not captured; please report "
                           "this.")
    lengths = np.array([len(s) for s in sequences])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    # One block per (step, request): rows [row, row + count) of the captured tensors are tokens [start, start + count)
    # of that request; all blocks go to one flat [total, H] buffer per layer in one indexed copy.
    # Internal request ids are the external ones + "-" + 8 random characters.
    resolved = {r: index.get(r, index.get(r.rsplit("-", 1)[0], -1)) for r in set(capture["req_ids"])}
    request = np.array([resolved[r] for r in capture["req_ids"]], dtype=np.int64)
    starts, counts = capture["starts"].astype(np.int64), capture["counts"].astype(np.int64)
    known = request >= 0  # blocks of requests of other calls (none expected) are skipped
    if (starts + counts > lengths[request])[known].any():
        raise RuntimeError("vLLM computed rows past the end of a sequence; please report this.")
    base = offsets[np.where(known, request, 0)] + starts - (np.cumsum(counts) - counts)
    dest = np.arange(int(counts.sum())) + np.repeat(base, counts)
    keep = np.repeat(known, counts)
    all_kept = bool(keep.all())
    dest, rows = torch.from_numpy(dest[keep]), torch.from_numpy(np.flatnonzero(keep))
    flat = {k: torch.empty(total, hidden_size) for k in layers}
    if len(rows):
        for k in layers:
            captured = torch.from_numpy(capture["states"][k])
            flat[k].index_copy_(0, dest, captured if all_kept else captured[rows])
    filled = np.zeros(total, dtype=bool)
    filled[dest.numpy()] = True
    for i in range(len(sequences)):
        for a, b in _missing_runs(filled[offsets[i]:offsets[i + 1]]):
            donor = next((j for j in range(len(sequences)) if j != i and lengths[j] >= b
                          and filled[offsets[j] + a:offsets[j] + b].all() and sequences[j][:b] == sequences[i][:b]),
                         None)
            if donor is None:
                raise RuntimeError(f"vLLM computed no state for tokens {a}..{b - 1} of request {i} (of "
                                   f"{lengths[i]}); please report this.")
            for k in layers:
                flat[k][offsets[i] + a:offsets[i] + b] = flat[k][offsets[donor] + a:offsets[donor] + b]
            filled[offsets[i] + a:offsets[i] + b] = True
    return [{k: flat[k][offsets[i]:offsets[i + 1]].clone() for k in layers} for i in range(len(sequences))]


def _missing_runs(filled: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) ranges where `filled` is False."""
    edges = np.flatnonzero(np.diff(np.concatenate([[1], filled.astype(np.int8), [1]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
