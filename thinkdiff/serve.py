"""An HTTP service that owns one `HiddenStateEngine` and answers hidden-state requests (stdlib only).

    python -m thinkdiff serve --model DIR --backend transformers [--host 127.0.0.1 --port 8765 --allowed-image-dir DIR]

Endpoints:

    GET  /health    -> JSON {model, backend, num_layers, hidden_size, max_images, limits...}
    POST /generate  <- JSON {"requests": [{"prompt": str, "images": [{"base64": str} | {"path": str}],
                                           "system": str | null}],
                             "layers": [int, ...], "sampling": {max_new_tokens, min_new_tokens, do_sample,
                                                                temperature, top_p, seed}}
                    -> safetensors bytes (application/octet-stream); for request i: `i.prompt_token_ids`,
                       `i.output_token_ids` (int64), `i.input_embed.L` and `i.output_embed.L` (the engine's dtype,
                       L resolved to 0..N as the engine returns it); metadata {"texts": JSON list of answers}.

Every bad request gets a 4xx JSON {"error": message}; engine errors that are the caller's fault (ValueError) are
400, others 500; the server keeps serving either way. Images by `path` are read only from inside
`--allowed-image-dir` (symlinks resolved); without that option only base64 images are accepted.

One worker thread owns the engine. Concurrent greedy calls with the same layers and sampling are merged into one
`engine.generate` call (up to `batch_requests` requests); sampled calls run alone so a seed gives the same answers
whoever else is calling. There is no authentication: the server binds to loopback unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError
from .failures import Failure, run_per_item
from .vlm.engine import HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest

logger = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_PORT = 8765
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_KEEP_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # passed to the engine as decoded, like an in-process PIL image


class ClientError(Exception):
    """A request the server refuses: `status` (4xx) and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass
class ServerLimits:
    max_body_bytes: int = 32 * MiB  # POST bodies above this get 413
    max_requests: int = 64  # requests per /generate call
    max_images: int = 64  # images per /generate call (all requests together)
    max_image_pixels: int = 40_000_000  # width * height of one decoded image
    max_new_tokens: int = 4096  # sampling.max_new_tokens above this gets 400
    max_queue: int = 256  # /generate calls waiting for the engine; more get 503
    drain_bytes: int = 256 * MiB  # an oversize body up to this size is read and dropped, so the client sees the 413


# ------------------------------------------------------------------------------------------- request parsing

_SAMPLING_TYPES = {"max_new_tokens": (int,), "min_new_tokens": (int,), "do_sample": (bool,),
                   "temperature": (int, float), "top_p": (int, float), "seed": (int, type(None)),
                   "first_index": (int,)}


def _is(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:  # JSON true is not an int here
        return False
    return isinstance(value, types)


def parse_sampling(obj, limits: ServerLimits) -> SamplingConfig:
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise ClientError(400, '"sampling" must be a JSON object.')
    unknown = sorted(set(obj) - set(_SAMPLING_TYPES))
    if unknown:
        raise ClientError(400, f"Unknown sampling field(s) {unknown}; known: {sorted(_SAMPLING_TYPES)}.")
    for key, value in obj.items():
        if not _is(value, _SAMPLING_TYPES[key]):
            names = "/".join("null" if t is type(None) else t.__name__ for t in _SAMPLING_TYPES[key])
            raise ClientError(400, f"sampling.{key} must be {names}, got {value!r}.")
    try:
        sampling = SamplingConfig(**obj)
    except ValueError as err:
        raise ClientError(400, f"Bad sampling: {err}") from None
    if sampling.max_new_tokens > limits.max_new_tokens:
        raise ClientError(400, f"sampling.max_new_tokens={sampling.max_new_tokens} is above this server's limit "
                               f"of {limits.max_new_tokens}.")
    if not sampling.temperature > 0:
        raise ClientError(400, f"sampling.temperature must be > 0, got {sampling.temperature}.")
    if not 0 < sampling.top_p <= 1:
        raise ClientError(400, f"sampling.top_p must be in (0, 1], got {sampling.top_p}.")
    if not 0 <= sampling.first_index < 2**31:
        raise ClientError(400, f"sampling.first_index must be in [0, 2**31), got {sampling.first_index}.")
    if sampling.seed is not None and not 0 <= sampling.seed < 2**63:
        raise ClientError(400, f"sampling.seed must be in [0, 2**63) or null, got {sampling.seed}.")
    return sampling


def parse_layers(obj, engine: HiddenStateEngine) -> list[int]:
    if obj is None:
        return []
    if not isinstance(obj, list) or not all(_is(v, (int,)) for v in obj):
        raise ClientError(400, '"layers" must be a list of integers.')
    try:
        return engine.resolve_layers(obj)
    except ValueError as err:
        raise ClientError(400, str(err)) from None


def _check_pixels(im: Image.Image, where: str, limits: ServerLimits) -> None:
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise ClientError(400, f"{where}: {w}x{h} pixels is above this server's limit of {limits.max_image_pixels}.")


def decode_base64_image(data, where: str, limits: ServerLimits) -> Image.Image:
    if not isinstance(data, str):
        raise ClientError(400, f"{where}: base64 must be a string.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ClientError(400, f"{where}: invalid base64 ({err}).") from None
    try:
        im = Image.open(io.BytesIO(raw))
        _check_pixels(im, where, limits)
        im.load()
    except ClientError:
        raise
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        raise ClientError(400, f"{where}: not a decodable image ({type(err).__name__}: {err}).") from None
    return im if im.mode in _KEEP_MODES else im.convert("RGB")


def load_allowed_image(path, where: str, allowed_dir: Path | None, limits: ServerLimits) -> Image.Image:
    """An RGB image from `path` (relative to `allowed_dir`, or absolute) if it resolves to a file inside it."""
    if allowed_dir is None:
        raise ClientError(403, f"{where}: image paths are disabled on this server (start it with "
                               "--allowed-image-dir); send the image as base64.")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ClientError(400, f"{where}: path must be a non-empty string.")
    try:
        resolved = (allowed_dir / path).resolve()  # symlinks resolved; an absolute `path` replaces allowed_dir
    except (OSError, RuntimeError) as err:  # symlink loops and the like
        raise ClientError(400, f"{where}: {path!r} cannot be resolved ({err}).") from None
    if not resolved.is_relative_to(allowed_dir):
        raise ClientError(403, f"{where}: {path!r} is outside the allowed image folder.")
    if not resolved.is_file():
        raise ClientError(400, f"{where}: no image file {path!r} in the allowed image folder.")
    try:
        with Image.open(resolved) as im:
            _check_pixels(im, where, limits)
            return im.convert("RGB")  # as thinkdiff.pipeline.load_image does for local paths
    except ClientError:
        raise
    except Exception as err:
        raise ClientError(400, f"{where}: {path!r} is not a decodable image ({type(err).__name__}: {err}).") from None


def parse_requests(obj, engine: HiddenStateEngine, allowed_dir: Path | None,
                   limits: ServerLimits) -> list[VLMRequest]:
    if not isinstance(obj, list) or not obj:
        raise ClientError(400, '"requests" must be a non-empty list.')
    if len(obj) > limits.max_requests:
        raise ClientError(413, f"{len(obj)} requests in one call; this server takes at most {limits.max_requests}.")
    n_images = sum(len(r.get("images") or []) if isinstance(r, dict) and isinstance(r.get("images"), list) else 0
                   for r in obj)
    if n_images > limits.max_images:
        raise ClientError(413, f"{n_images} images in one call; this server takes at most {limits.max_images}.")
    requests = []
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise ClientError(400, f"requests[{i}] must be a JSON object.")
        unknown = sorted(set(r) - {"prompt", "images", "system"})
        if unknown:
            raise ClientError(400, f"requests[{i}]: unknown field(s) {unknown}; known: prompt, images, system.")
        prompt, system, images = r.get("prompt"), r.get("system"), r.get("images") or []
        if not isinstance(prompt, str) or not prompt.strip():
            raise ClientError(400, f"requests[{i}].prompt must be a non-empty string.")
        if system is not None and not isinstance(system, str):
            raise ClientError(400, f"requests[{i}].system must be a string or null.")
        if not isinstance(images, list):
            raise ClientError(400, f"requests[{i}].images must be a list.")
        if engine.max_images is not None and len(images) > engine.max_images:
            raise ClientError(400, f"requests[{i}] has {len(images)} images but this model supports at most "
                                   f"{engine.max_images} per request.")
        pil = []
        for j, im in enumerate(images):
            where = f"requests[{i}].images[{j}]"
            if not isinstance(im, dict) or len(im) != 1 or not ({"base64", "path"} & set(im)):
                raise ClientError(400, f'{where} must be {{"base64": ...}} or {{"path": ...}}.')
            if "base64" in im:
                pil.append(decode_base64_image(im["base64"], where, limits))
            else:
                pil.append(load_allowed_image(im["path"], where, allowed_dir, limits))
        try:
            requests.append(VLMRequest(prompt, pil, system=system))
        except ValueError as err:
            raise ClientError(400, f"requests[{i}]: {err}") from None
    return requests


def encode_states(states: list[HiddenStates]) -> bytes:
    """The /generate response body: safetensors bytes, keys `i.<name>`, metadata {"texts": JSON list}."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for i, s in enumerate(states):
        tensors[f"{i}.prompt_token_ids"] = s.prompt_token_ids.long().cpu().contiguous()
        tensors[f"{i}.output_token_ids"] = s.output_token_ids.long().cpu().contiguous()
        for kind, embeds in (("input_embed", s.input_embed), ("output_embed", s.output_embed)):
            for layer, t in embeds.items():
                tensors[f"{i}.{kind}.{layer}"] = t.detach().cpu().clone()  # own storage: no shared-memory refusal
    return save(tensors, metadata={"texts": json.dumps([s.text for s in states])})


# ------------------------------------------------------------------------------------------------ batching


@dataclass
class _Job:
    requests: list[VLMRequest]
    layers: list[int]
    sampling: SamplingConfig
    done: threading.Event = field(default_factory=threading.Event)
    result: list[HiddenStates] | None = None
    error: BaseException | None = None

    @property
    def key(self):
        """Jobs with equal keys can share one engine call; sampled jobs never do (their seed is per call)."""
        if self.sampling.do_sample:
            return None
        return tuple(self.layers), dataclasses.astuple(self.sampling)


class EngineWorker:
    """The one thread that calls the engine; merges waiting compatible jobs into one `generate` call."""

    def __init__(self, engine: HiddenStateEngine, batch_requests: int = 32, max_queue: int = 256):
        self.engine = engine
        self.batch_requests = max(1, batch_requests)
        self.max_queue = max_queue
        self.stats = {"engine_calls": 0, "jobs": 0, "requests": 0, "merged_jobs": 0}
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="thinkdiff-engine", daemon=True)
        self._thread.start()

    def submit(self, requests, layers, sampling) -> list[HiddenStates]:
        job = _Job(requests, layers, sampling)
        with self._cond:
            if self._closed:
                raise RuntimeError("The server is shutting down.")
            if len(self._pending) >= self.max_queue:
                raise ClientError(503, f"The server is busy ({len(self._pending)} calls waiting); retry later.")
            self._pending.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    @property
    def pending(self) -> int:
        """Calls waiting for the engine (not counting the one it is running)."""
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float | None = 30) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[_Job]:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return []
            first = self._pending.popleft()
            batch, total = [first], len(first.requests)
            if first.key is not None:
                rest = deque()
                while self._pending:
                    job = self._pending.popleft()
                    if job.key == first.key and total + len(job.requests) <= self.batch_requests:
                        batch.append(job)
                        total += len(job.requests)
                    else:
                        rest.append(job)
                self._pending = rest
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._execute(batch)
            except Exception as err:  # the worker must outlive any one call, or every later call would hang
                logger.exception("Engine worker error")
                for job in batch:
                    if job.result is None and job.error is None:
                        job.error = err
            finally:
                for job in batch:
                    if job.result is None and job.error is None:
                        job.error = RuntimeError("The engine worker stopped before answering.")
                    job.done.set()

    def _execute(self, batch: list[_Job]) -> None:
        """One engine call for the whole batch of jobs; if it fails, one call per job, so errors land where they
        belong."""
        self.stats["jobs"] += len(batch)
        self.stats["requests"] += sum(len(j.requests) for j in batch)

        def call(jobs: list[_Job]) -> list[list[HiddenStates]]:
            self.stats["engine_calls"] += 1
            requests = [r for j in jobs for r in j.requests]
            states = self.engine.generate(requests, jobs[0].layers, jobs[0].sampling, progress=False)
            if len(states) != len(requests):
                raise RuntimeError(f"The engine answered {len(states)} of {len(requests)} requests.")
            bounds = np.cumsum([0] + [len(j.requests) for j in jobs])
            return [states[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

        calls = self.stats["engine_calls"]
        results = run_per_item(call, batch, "merged engine call")
        if len(batch) > 1 and self.stats["engine_calls"] == calls + 1:  # the merged call answered every job
            self.stats["merged_jobs"] += len(batch)
        for job, result in zip(batch, results):
            if isinstance(result, Failure):
                job.error = result.error
            else:
                job.result = result


# ---------------------------------------------------------------------------------------------- HTTP server


class HiddenStateServer(ThreadingHTTPServer):
    """`HiddenStateServer(engine, port=0).start()` serves in a background thread; `.url`, `.close()`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine: HiddenStateEngine, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 model_name: str = "", backend: str = "", allowed_image_dir: str | Path | None = None,
                 limits: ServerLimits | None = None, batch_requests: int = 32, request_timeout: float = 120.0):
        self.engine = engine
        self.model_name = model_name or str(getattr(engine, "model_path", "") or type(engine).__name__)
        self.backend = backend or type(engine).__name__
        self.limits = limits or ServerLimits()
        self.request_timeout = request_timeout
        self.allowed_image_dir = None
        if allowed_image_dir is not None:
            self.allowed_image_dir = Path(allowed_image_dir).expanduser().resolve(strict=True)
            if not self.allowed_image_dir.is_dir():
                raise ConfigError(f"--allowed-image-dir {allowed_image_dir} is not a folder.")
        if host not in _LOOPBACK:
            logger.warning("Serving on %s: this server has no authentication; anyone who can reach it can run the "
                           "model%s.", host, " and read images under " + str(self.allowed_image_dir)
                           if self.allowed_image_dir else "")
        self.worker = EngineWorker(engine, batch_requests=batch_requests, max_queue=self.limits.max_queue)
        self._thread: threading.Thread | None = None
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def health(self) -> dict:
        e, lim = self.engine, self.limits
        return {"model": self.model_name, "backend": self.backend, "num_layers": e.num_layers,
                "hidden_size": e.hidden_size, "max_images": e.max_images,
                "max_requests": lim.max_requests, "max_images_per_call": lim.max_images,
                "max_body_bytes": lim.max_body_bytes, "max_new_tokens": lim.max_new_tokens,
                "image_paths": self.allowed_image_dir is not None}

    def generate(self, body: bytes) -> bytes:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ClientError(400, f"The body is not valid JSON ({err}).") from None
        if not isinstance(payload, dict):
            raise ClientError(400, "The body must be a JSON object with \"requests\".")
        unknown = sorted(set(payload) - {"requests", "layers", "sampling"})
        if unknown:
            raise ClientError(400, f"Unknown field(s) {unknown}; known: requests, layers, sampling.")
        layers = parse_layers(payload.get("layers"), self.engine)
        sampling = parse_sampling(payload.get("sampling"), self.limits)
        requests = parse_requests(payload.get("requests"), self.engine, self.allowed_image_dir, self.limits)
        try:
            states = self.worker.submit(requests, layers, sampling)
        except ValueError as err:  # the engine says the request is wrong
            raise ClientError(400, str(err)) from None
        return encode_states(states)

    def start(self) -> HiddenStateServer:
        """Serve in a daemon thread (tests, notebooks); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="thinkdiff-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` can be refused before the body comes
    server: HiddenStateServer
    server_version = "ThinkDiff"

    def setup(self):
        self.timeout = self.server.request_timeout  # socket timeout: a stalled client cannot hold a thread forever
        super().setup()

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # ------------------------------------------------------------------ body

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ClientError(411, "Chunked bodies are not supported; send Content-Length.")
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise ClientError(411, "Content-Length is required.")
        try:
            length = int(value)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ClientError(400, f"Bad Content-Length {value!r}.") from None
        return length

    def _too_large(self, length: int) -> ClientError:
        return ClientError(413, f"The body is {length} bytes; this server takes at most "
                                f"{self.server.limits.max_body_bytes} bytes per call (send fewer requests or "
                                "smaller images per call).")

    def handle_expect_100(self):
        try:
            length = self._content_length()
            if length > self.server.limits.max_body_bytes:
                raise self._too_large(length)
        except ClientError as err:
            self.close_connection = True
            self._error(err.status, err.message)
            return False
        return super().handle_expect_100()

    def _read_body(self) -> bytes:
        length = self._content_length()
        limits = self.server.limits
        if length > limits.max_body_bytes:
            self.close_connection = True
            if length <= limits.drain_bytes:  # read and drop it, so the client gets our answer, not a reset
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, MiB))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise self._too_large(length)
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise ClientError(400, f"The body ended after {len(body)} of {length} bytes.")
        return body

    # ------------------------------------------------------------------ routes

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            return self._json(200, self.server.health())
        self._error(404, f"No such endpoint GET {self.path}; try GET /health or POST /generate.")

    def do_POST(self):
        start = time.perf_counter()
        try:
            if self.path.split("?")[0] != "/generate":
                self.close_connection = True  # the body is not read
                raise ClientError(404, f"No such endpoint POST {self.path}; try POST /generate.")
            body = self.server.generate(self._read_body())
        except ClientError as err:
            return self._error(err.status, err.message)
        except Exception as err:
            logger.exception("Engine error on /generate")
            return self._error(500, f"Engine error: {type(err).__name__}: {err}")
        self._send(200, body, "application/octet-stream")
        logger.debug("/generate answered in %.3f s (%d bytes)", time.perf_counter() - start, len(body))

    def _no_method(self):
        self.close_connection = True
        self._error(405, f"Method {self.command} is not allowed; use GET /health or POST /generate.")

    do_PUT = do_DELETE = do_PATCH = _no_method


# ---------------------------------------------------------------------------------------------------- CLI


def add_serve_parser(subparsers) -> None:
    """Add `serve` to `python -m thinkdiff`'s subcommands."""
    from .vlm import BACKENDS

    p = subparsers.add_parser(
        "serve", help="serve one VLM's hidden states over HTTP (vlm.backend=remote talks to it)",
        description="Loads the VLM once and answers POST /generate with safetensors hidden states; GET /health "
                    "describes the model. No authentication: binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--model", required=True, help="model folder, cached Hugging Face repo id, or tiny:KIND")
    p.add_argument("--backend", default="transformers", choices=[b for b in BACKENDS if b != "remote"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-images", type=int, default=None, help="images per request (default: the model's limit)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--allowed-image-dir", default=None,
                   help="allow {\"path\": ...} images, only from inside this folder (default: base64 only)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest POST body in MiB")
    p.add_argument("--max-requests", type=int, default=64, help="requests per /generate call")
    p.add_argument("--max-images-per-call", type=int, default=64)
    p.add_argument("--max-new-tokens-limit", type=int, default=4096)
    p.add_argument("--batch-requests", type=int, default=32,
                   help="most requests merged from concurrent greedy calls into one engine call (1: no merging)")
    p.set_defaults(func=cmd_serve)


def build_server(args) -> HiddenStateServer:
    """The server `serve` would run for parsed `args` (loads the engine; not yet serving)."""
    from .config import VLMConfig
    from .vlm import make_engine

    config = VLMConfig(model=args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                       max_images=args.max_images)
    engine = make_engine(config)
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * MiB), max_requests=args.max_requests,
                          max_images=args.max_images_per_call, max_new_tokens=args.max_new_tokens_limit)
    return HiddenStateServer(engine, args.host, args.port, model_name=args.model, backend=args.backend,
                             allowed_image_dir=args.allowed_image_dir, limits=limits,
                             batch_requests=args.batch_requests)


def cmd_serve(args) -> int:
    server = build_server(args)
    engine = server.engine
    print(f"Serving {args.model} ({args.backend}, {engine.num_layers} layers, hidden {engine.hidden_size}) on "
          f"{server.url}; clients use vlm.backend=remote vlm.model={server.url}", flush=True)
    if threading.current_thread() is threading.main_thread():  # `kill` stops it as cleanly as Ctrl-C
        import signal

        def _stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Stopping the server")
    finally:
        server.server_close()
        server.worker.close()
    return 0
