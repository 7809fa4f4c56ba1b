"""A vLLM logits processor that lets the row of an answer's end token be computed while generating.

vLLM stops a request when it samples an end-of-sequence token, so the step with that token as *input* (its layer-L
row, which our hidden-state contract includes) never runs. Requests that ask for it (`extra_args["thinkdiff"]`) run
with `ignore_eos=True` and `stop_token_ids=[sentinel]`: after an end token this processor forces the sentinel, so
vLLM runs exactly one more step (computing the end token's row) and then stops on the sentinel, which the engine
drops. The sentinel (the pad token) is masked at every other step, in every request, and the transformers engine
suppresses it too, so both engines sample from the same distribution; so are, when sampling, the model's image
placeholders and vision delimiters (`engine.vision_token_ids`).

vLLM internals used (0.32, pinned): `vllm.v1.sample.logits_processor.AdapterLogitsProcessor` (per-request logits
callables that see the request's live output token list), loaded by the engine as
`thinkdiff.vlm.vllm_answer_end:AnswerEndProcessor`.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

EXTRA_ARGS_KEY = "thinkdiff"
FQCN = "thinkdiff.vlm.vllm_answer_end:AnswerEndProcessor"


class AnswerEnd:
    """Per request: mask the sentinel and the `suppressed` tokens (when sampling: image placeholders and vision
    delimiters); with `force`, make the sentinel the only choice right after an end token."""

    def __init__(self, end_ids: list[int], sentinel: int, force: bool, suppressed: list[int]):
        self.end_ids, self.sentinel, self.force = frozenset(end_ids), sentinel, force
        self.masked = torch.tensor([sentinel, *suppressed], dtype=torch.long)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.force and output_ids and output_ids[-1] in self.end_ids:
            forced = torch.full_like(logits, -float("inf"))
            forced[self.sentinel] = 0.0
            return forced
        logits[self.masked.to(logits.device)] = -float("inf")
        return logits


class AnswerEndProcessor(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params) -> AnswerEnd | None:
        spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if spec is None:
            return None
        return AnswerEnd(spec["end_ids"], spec["sentinel"], spec["force"], spec["suppressed"])
