"""The ThinkDiff server (FastAPI on uvicorn): one engine, its calls queued and admitted before any work.

    python -m thinkdiff serve --model DIR [--backend transformers|vllm]     hidden states
    python -m thinkdiff serve --config PIPELINE.yaml                       hidden states and images

Endpoints:

    GET  /health    -> JSON {model, backend, num_layers, hidden_size, max_images, context_length, limits...,
                             engine: {state: idle|busy|stuck, queued, ...}}; 503 when the engine is stuck
    GET  /metrics   -> Prometheus text: calls by endpoint and status, latency, queue depth, tokens, images
    POST /generate  <- JSON {"requests": [{"prompt": str, "images": [{"base64": str} | {"path": str}],
                                           "system": str | null}],
                             "layers": [int, ...], "sampling": {max_new_tokens, min_new_tokens, do_sample,
                                                                temperature, top_p, seed, first_index}}
                    -> safetensors bytes (features.encode_states): for request i `i.prompt_token_ids`,
                       `i.output_token_ids`, `i.input_embed.L`, `i.output_embed.L`; metadata {"texts": [...]}
    POST /v1/images/generations (with --config)
                    <- JSON {"prompt", "n", "size": "WxH", "response_format": "b64_json", "images": [base64, ...],
                             "seed", "num_inference_steps", "guidance_scale"}
                    -> JSON {"created", "data": [{"b64_json": PNG}], "answer", "timings", "settings"}

Checks happen before any engine work (admission.py). On vLLM, calls join one continuously refilled batch
(thinkdiff/vlm/vllm_stream.py); other engines run calls one at a time in arrival order (worker.py), never merged.
"""

from .admission import ClientError, ServerLimits
from .app import ThinkDiffService, create_app
from .cli import add_serve_parser, build_server
from .server import HiddenStateServer

__all__ = ["ClientError", "HiddenStateServer", "ServerLimits", "ThinkDiffService", "add_serve_parser",
           "build_server", "create_app"]
