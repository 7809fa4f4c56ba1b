"""What the vLLM engine runs on each vLLM worker, as a worker extension (`vllm.LLM(worker_extension_cls=...)`, vLLM's
public way to add methods to its workers; they are called by name through `LLM.collective_rpc`, so nothing is
pickled and no insecure serialization is switched on).

* `thinkdiff_install_hooks` / `thinkdiff_collect_hooks`: forward hooks on the text decoder record the residual
  stream of the requested layers for every row the model computes (vllm_engine.py explains how rows become states).
* `thinkdiff_load_weights`: weight sync, e.g. a GRPO policy's weights after each update.

The model runner is read through vllm_compat.py only.
"""

from __future__ import annotations

import numpy as np
import torch

from . import vllm_compat

WORKER_EXTENSION = f"{__name__}.HiddenStateWorkerExtension"


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    for candidate in (getattr(model, "language_model", None), getattr(model, "model", None)):
        for inner in (candidate, getattr(candidate, "model", None)):
            if inner is not None and hasattr(inner, "layers") and hasattr(inner, "norm"):
                return inner
    raise RuntimeError(f"Cannot find the text decoder (layers + norm) in {type(model).__name__}.")


def _residual_stream(args, kwargs) -> torch.Tensor:
    """The residual stream entering a decoder layer: vLLM layers are called as layer(positions, hidden_states,
    residual) and carry it as hidden + residual; transformers layers (vLLM's Transformers backend) as
    layer(hidden_states [1, T, H], ...)."""
    if args and args[0].is_floating_point():
        return args[0]
    if not args and "positions" not in kwargs:
        return kwargs["hidden_states"]
    hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
    residual = args[2] if len(args) > 2 else kwargs.get("residual")
    return hidden if residual is None else hidden + residual


class HiddenStateWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (`self.model_runner`)."""

    def thinkdiff_install_hooks(self, layers: list[int], num_layers: int) -> None:
        runner = self.model_runner
        text = _text_model(runner.get_model())
        wanted = sorted(layers)
        steps, handles = [], []

        def capture(upto: int, stream) -> None:
            """Record stream() as the state of every requested layer <= upto not yet recorded this step (a layer
            that did not run, such as Mllama's cross-attention without images, is the identity)."""
            _, bounds, _, record = steps[-1]
            due = [k for k in wanted if k <= upto and k not in record]
            if due:
                rows = stream()
                rows = rows[0] if rows.dim() == 3 else rows  # transformers backend: [1, T, H]
                # A copy: vLLM reuses its buffers in place. Moved to the CPU when collected (no sync per step).
                rows = rows[:int(bounds[-1])].detach().to(torch.float32, copy=True)
                record.update((k, rows) for k in due)

        def layer_pre_hook(index):
            def hook(module, args, kwargs):
                if index == 0:  # a new step: its batch layout
                    steps.append((*vllm_compat.step_layout(runner), {}))
                capture(index, lambda: _residual_stream(args, kwargs))
            return hook

        def norm_pre_hook(module, args, kwargs):
            capture(num_layers - 1, lambda: args[0] if len(args) < 2 or args[1] is None else args[0] + args[1])

        def norm_hook(module, args, kwargs, output):
            capture(num_layers, lambda: output[0] if isinstance(output, tuple) else output)

        # Layer 0 starts a step; later layers from the first requested one on (a skipped layer's state is recorded
        # by the next hook that runs); the norm's input for layer N-1, its output for N.
        for i, layer in enumerate(text.layers):
            if i == 0 or i >= wanted[0]:
                handles.append(layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True))
        if wanted[0] < num_layers:
            handles.append(text.norm.register_forward_pre_hook(norm_pre_hook, with_kwargs=True))
        if wanted[-1] == num_layers:
            handles.append(text.norm.register_forward_hook(norm_hook, with_kwargs=True))
        self._thinkdiff_capture = (steps, handles)

    def thinkdiff_collect_hooks(self) -> dict:
        """Remove the hooks; return the recorded rows: per (step, request) block its request id, first token and
        row count, and per layer all steps' rows concatenated (one float32 array per layer, in block order)."""
        steps, handles = getattr(self, "_thinkdiff_capture", ([], []))
        for h in handles:
            h.remove()
        self.__dict__.pop("_thinkdiff_capture", None)
        steps = [s for s in steps if s[0]]
        layers = sorted({k for s in steps for k in s[3]})
        missing = sorted({k for s in steps for k in layers if k not in s[3]})
        empty = np.zeros(0, np.int64)
        return {"missing": missing, "req_ids": [r for s in steps for r in s[0]],
                "starts": np.concatenate([s[2] for s in steps]) if steps else empty,
                "counts": np.concatenate([np.diff(s[1]) for s in steps]) if steps else empty,
                "states": {} if missing else {k: torch.cat([s[3][k] for s in steps]).cpu().numpy() for k in layers}}

    def thinkdiff_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        vllm_compat.reload_weights(self.model_runner, named_tensors)

    def thinkdiff_missing_internals(self) -> list[str]:
        """The vLLM internals (vllm_compat.RUNNER_ATTRIBUTES) this worker's model runner lacks."""
        return vllm_compat.missing_runner_attributes(self.model_runner)
