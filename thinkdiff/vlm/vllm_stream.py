"""Continuous batching on a `VLLMEngine`, for a server: requests that arrive while others run join vLLM's running
batch at the next engine step, and each call is answered as soon as its own requests finish.

    stream = VLLMStream(engine)          # owns the engine from now on: one thread steps it
    future = stream.submit(requests, layers, sampling)   # concurrent.futures.Future -> list[HiddenStates]
    stream.cancel(future)                # the client has gone: its requests leave the batch
    stream.close()

The loop drives vLLM's `LLMEngine` through its public `add_request` / `step` / `abort_request`. Hidden states come
from the same worker hooks as `VLLMEngine.generate` (vllm_worker.py), installed before each step for the layers
that the running requests want and collected after it, so every row of every request is recorded in the step that
computes it. Each request carries a `cache_salt` of its own, so vLLM's prefix cache never skips rows of one request
because another computed them. Request i of a call samples with the seed derived from (seed, first_index + i),
as in `generate`, so an answer does not depend on what else is in the batch (greedy answers can still differ from a
one-request run where batched kernels round differently; the states agree within float32 noise).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.sampling_params import RequestOutputKind

from .engine import HiddenStates, SamplingConfig, VLMRequest

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    requests: list[VLMRequest]
    layers: list[int]
    sampling: SamplingConfig
    future: Future = field(default_factory=Future)
    ids: list[str] = field(default_factory=list)  # vLLM request ids, in request order
    prompts: list[list[int]] = field(default_factory=list)
    results: dict[int, HiddenStates] = field(default_factory=dict)


@dataclass
class _Running:
    call: _Call
    index: int  # the request's place in its call
    blocks: list[tuple[int, dict[int, np.ndarray]]] = field(default_factory=list)  # (first token, layer -> rows)


class VLLMStream:
    def __init__(self, engine):
        self.engine, self.core = engine, engine.llm.llm_engine
        self.steps = 0
        self._inbox: queue.Queue = queue.Queue()
        self._running: dict[str, _Running] = {}
        self._counter = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="thinkdiff-vllm-stream", daemon=True)
        self._thread.start()

    def submit(self, requests: list[VLMRequest], layers: list[int], sampling: SamplingConfig | None = None) -> Future:
        """Queue one call; its future gives its HiddenStates in request order (or the error that refused it)."""
        call = _Call(requests, self.engine.resolve_layers(layers), sampling or SamplingConfig())
        self.engine.check_requests(requests)
        self._inbox.put(call)
        return call.future

    def cancel(self, future: Future) -> None:
        """Drop a call (its client has gone): a waiting one never starts, a running one's requests leave the batch
        at the next step."""
        if not future.cancel():
            self._inbox.put(("cancel", future))

    @property
    def running(self) -> int:
        """Requests in vLLM's batch now."""
        return len(self._running)

    def close(self, timeout: float | None = 30) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # --------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._closed:
            try:
                self._take(block=not self._running)
                if self._running:
                    self._step()
            except Exception as err:  # a broken step fails the calls in flight, never the loop
                logger.exception("vLLM stream step failed")
                for call in {r.call for r in self._running.values()}:
                    self._fail(call, err)
        for call in {r.call for r in self._running.values()}:
            self._fail(call, RuntimeError("The server is shutting down."))

    def _take(self, block: bool) -> None:
        """Admit what arrived: new calls join the batch, cancelled ones leave it."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, tuple):
                self._fail(next((r.call for r in self._running.values() if r.call.future is item[1]), None), None)
            elif item.future.set_running_or_notify_cancel():
                self._add(item)

    def _add(self, call: _Call) -> None:
        engine = self.engine
        try:
            call.prompts = [engine.checked_prompt_ids(r, i) for i, r in enumerate(call.requests)]
            for i, (request, ids) in enumerate(zip(call.requests, call.prompts)):
                params = engine.sampling_params(call.sampling, call.sampling.first_index + i, bool(call.layers))
                params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = f"stream-{next(self._counter)}"
                prompt = {**engine.vllm_prompt(ids, request), "cache_salt": rid}
                self._running[rid] = _Running(call, i)
                call.ids.append(rid)
                self.core.add_request(rid, prompt, params)
        except Exception as err:
            self._fail(call, err)

    def _fail(self, call: _Call | None, err: BaseException | None) -> None:
        """Take a call's requests out of the batch; answer it with `err` (None: it was cancelled)."""
        if call is None:
            return
        live = [rid for rid in call.ids if rid in self._running]
        for rid in live:
            del self._running[rid]
        if live:
            self.core.abort_request(live)
        if not call.future.done():
            call.future.set_exception(err if err is not None else CancelledError())

    def _step(self) -> None:
        layers = sorted({k for r in self._running.values() for k in r.call.layers})
        if layers:
            self.engine.llm.collective_rpc("thinkdiff_install_hooks", args=(layers, self.engine.num_layers))
        try:
            outputs = self.core.step()
        finally:
            if layers:
                self._file(self.engine.llm.collective_rpc("thinkdiff_collect_hooks")[0])
        self.steps += 1
        for output in outputs:
            running = self._running.get(output.request_id)
            if output.finished and running is not None:
                del self._running[output.request_id]
                self._finish(running, list(output.outputs[0].token_ids))

    def _file(self, capture: dict) -> None:
        """Give each running request the rows this step computed for it (internal ids are ours + "-" + 8
        characters)."""
        if capture["missing"]:
            raise RuntimeError(f"vLLM ran a step in which layers {capture['missing']} were not captured.")
        row = 0
        for rid, start, count in zip(capture["req_ids"], capture["starts"], capture["counts"]):
            running = self._running.get(rid) or self._running.get(rid.rsplit("-", 1)[0])
            if running is not None and running.call.layers:
                rows = {k: capture["states"][k][row:row + int(count)] for k in running.call.layers}
                running.blocks.append((int(start), rows))
            row += int(count)

    def _finish(self, running: _Running, generated: list[int]) -> None:
        engine, call, i = self.engine, running.call, running.index
        layers = call.layers
        prompt = call.prompts[i]
        answer = engine.kept_answer(prompt, generated, call.sampling.max_new_tokens, bool(layers))
        length = len(prompt) + len(answer)
        state = {k: torch.empty(length, engine.hidden_size) for k in layers}
        filled = np.zeros(length, dtype=bool)
        for start, rows in running.blocks:
            stop = min(length, start + len(next(iter(rows.values()))))
            for k in layers:
                state[k][start:stop] = torch.from_numpy(rows[k][:stop - start])
            filled[start:stop] = True
        if layers and not filled.all():
            self._fail(call, RuntimeError(f"vLLM computed no state for {int((~filled).sum())} of {length} tokens "
                                          f"of request {i}; please report this."))
            return
        call.results[i] = engine.hidden_states(prompt, answer, state)
        if len(call.results) == len(call.requests) and not call.future.done():
            call.future.set_result([call.results[j] for j in range(len(call.requests))])
