"""`python -m thinkdiff serve`: a VLM's hidden states (--model), or the whole ThinkDiff pipeline (--config)."""

from __future__ import annotations

from ..errors import ConfigError
from .admission import MiB, ServerLimits
from .server import API_KEY_ENV, DEFAULT_PORT, HiddenStateServer, api_key_from


def add_serve_parser(subparsers) -> None:
    """Add `serve` to `python -m thinkdiff`'s subcommands."""
    from ..vlm import BACKENDS

    p = subparsers.add_parser(
        "serve", help="serve a VLM's hidden states, or the whole pipeline's images, over HTTP",
        description="FastAPI on uvicorn. --model DIR: POST /generate answers hidden states (safetensors; "
                    "vlm.backend=remote is its client). --config PIPELINE.yaml: also POST /v1/images/generations "
                    "(OpenAI's images API shape). GET /health, GET /metrics (Prometheus). Binds to 127.0.0.1; "
                    f"any other host needs --api-key (or {API_KEY_ENV}).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="VLM folder, cached Hugging Face repo id, or tiny:KIND (hidden states only)")
    source.add_argument("--config", help="a pipeline YAML (infer.py's): serve its VLM's states and its images")
    p.add_argument("--backend", default="transformers", choices=[b for b in BACKENDS if b != "remote"],
                   help="with --model (a --config names its own)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-images", type=int, default=None, help="images per request (default: the model's limit)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; needed beyond loopback)")
    p.add_argument("--allowed-image-dir", default=None,
                   help="allow {\"path\": ...} images, only from inside this folder (default: base64 only)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest POST body in MiB")
    p.add_argument("--max-requests", type=int, default=64, help="requests per /generate call")
    p.add_argument("--max-images-per-call", type=int, default=16)
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height of one image")
    p.add_argument("--max-new-tokens-limit", type=int, default=4096)
    p.add_argument("--request-timeout", type=float, default=300, help="seconds a call may take, queue included")
    p.add_argument("--max-connections", type=int, default=256, help="open connections; more get 503")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def build_server(args) -> HiddenStateServer:
    """The server `serve` would run for parsed `args` (loads the models; not yet serving)."""
    from ..config import VLMConfig
    from ..vlm import make_engine

    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * MiB), max_requests=args.max_requests,
                          max_images=args.max_images_per_call, max_image_pixels=args.max_image_pixels,
                          max_new_tokens=args.max_new_tokens_limit, request_timeout=args.request_timeout,
                          max_connections=args.max_connections)
    if args.config:
        from ..pipeline import ThinkDiffPipeline

        pipeline = ThinkDiffPipeline.from_config(args.config)
        if pipeline.engine is None:
            raise ConfigError(f"{args.config} builds no VLM engine to serve.")
        engine, name, backend = pipeline.engine, args.config, pipeline.config.vlm.backend
    else:
        config = VLMConfig(model=args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                           max_images=args.max_images)
        pipeline, engine, name, backend = None, make_engine(config), args.model, args.backend
    return HiddenStateServer(engine, args.host, args.port, pipeline=pipeline, model_name=name, backend=backend,
                             allowed_image_dir=args.allowed_image_dir, limits=limits,
                             api_key=api_key_from(args.api_key), log_level=args.log_level)


def cmd_serve(args) -> int:
    server = build_server(args)
    engine = server.engine
    what = "states and images" if server.service.pipeline is not None else "states"
    scheme_host = f"http://[{args.host}]" if ":" in args.host else f"http://{args.host}"
    print(f"Serving {what} of {server.service.model_name} ({server.service.backend}, {engine.num_layers} layers, "
          f"hidden {engine.hidden_size}) on {scheme_host}:{args.port}; clients use vlm.backend=remote "
          f"vlm.model={scheme_host}:{args.port}", flush=True)
    server.serve_forever()
    return 0
