"""Admission control: every check a call must pass before it waits for the engine, so a bad or oversized call
costs the server no engine time.

Images are refused by their pixel count, read from the file header before anything is decoded; prompts by their
token count (chat template and image tokens included, counted with a processor of their own) against the model's
context, together with `max_new_tokens`.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..vlm.engine import HiddenStateEngine, SamplingConfig, VLMRequest
from .schemas import ImageRef, Sampling, StatesRequest

MiB = 1 << 20
_KEEP_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # passed to the engine as decoded, like an in-process PIL image


class ClientError(Exception):
    """A call the server refuses: `status` (4xx, or 503/504) and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass
class ServerLimits:
    max_body_bytes: int = 32 * MiB  # POST bodies above this get 413
    max_requests: int = 64  # requests per /generate call
    max_images: int = 16  # images per call (all requests together)
    max_image_pixels: int = 4096 * 4096  # width * height of one image, read from its header before decoding
    max_new_tokens: int = 4096  # sampling.max_new_tokens above this gets 400 (and prompt + answer <= context)
    max_queue: int = 256  # calls waiting for the engine; more get 503
    request_timeout: float = 300.0  # seconds from arrival to answer; a call not answered by then gets 504
    body_timeout: float = 30.0  # seconds to receive a body; slower clients get 408
    max_connections: int = 256  # open connections and running calls; more get 503 (uvicorn's limit_concurrency)


def check_sampling(sampling: Sampling, limits: ServerLimits) -> SamplingConfig:
    if sampling.max_new_tokens > limits.max_new_tokens:
        raise ClientError(400, f"sampling.max_new_tokens={sampling.max_new_tokens} is above this server's limit "
                               f"of {limits.max_new_tokens}.")
    return SamplingConfig(**sampling.model_dump())


def check_layers(layers: list[int], engine: HiddenStateEngine) -> list[int]:
    try:
        return engine.resolve_layers(layers)
    except ValueError as err:
        raise ClientError(400, str(err)) from None


def check_counts(requests: list[StatesRequest], engine: HiddenStateEngine, limits: ServerLimits) -> None:
    """How many requests and images a call holds: checked before any image is read."""
    if len(requests) > limits.max_requests:
        raise ClientError(413, f"{len(requests)} requests in one call; this server takes at most "
                               f"{limits.max_requests}.")
    n_images = sum(len(r.images) for r in requests)
    if n_images > limits.max_images:
        raise ClientError(413, f"{n_images} images in one call; this server takes at most {limits.max_images}.")
    for i, r in enumerate(requests):
        if engine.max_images is not None and len(r.images) > engine.max_images:
            raise ClientError(400, f"requests[{i}] has {len(r.images)} images but this model supports at most "
                                   f"{engine.max_images} per request.")


def _open_checked(source, where: str, limits: ServerLimits) -> Image.Image:
    try:
        im = Image.open(source)
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        raise ClientError(400, f"{where}: not a decodable image ({type(err).__name__}: {err}).") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise ClientError(400, f"{where}: {w}x{h} = {w * h} pixels is above this server's limit of "
                               f"{limits.max_image_pixels} per image.")
    try:
        im.load()
    except Exception as err:
        raise ClientError(400, f"{where}: not a decodable image ({type(err).__name__}: {err}).") from None
    return im


def decode_base64_image(data: str, where: str, limits: ServerLimits) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ClientError(400, f"{where}: invalid base64 ({err}).") from None
    im = _open_checked(io.BytesIO(raw), where, limits)
    return im if im.mode in _KEEP_MODES else im.convert("RGB")


def load_allowed_image(path: str, where: str, allowed_dir: Path | None, limits: ServerLimits) -> Image.Image:
    """An RGB image from `path` (relative to `allowed_dir`, or absolute) if it resolves to a file inside it."""
    if allowed_dir is None:
        raise ClientError(403, f"{where}: image paths are disabled on this server (start it with "
                               "--allowed-image-dir); send the image as base64.")
    if not path or "\x00" in path:
        raise ClientError(400, f"{where}: path must be a non-empty string.")
    try:
        resolved = (allowed_dir / path).resolve()  # symlinks resolved; an absolute `path` replaces allowed_dir
    except (OSError, RuntimeError) as err:  # symlink loops and the like
        raise ClientError(400, f"{where}: {path!r} cannot be resolved ({err}).") from None
    if not resolved.is_relative_to(allowed_dir):
        raise ClientError(403, f"{where}: {path!r} is outside the allowed image folder.")
    if not resolved.is_file():
        raise ClientError(400, f"{where}: no image file {path!r} in the allowed image folder.")
    with open(resolved, "rb") as f:
        im = _open_checked(f, where, limits)
        return im.convert("RGB")  # as thinkdiff.pipeline.load_image does for local paths


def load_image(ref: ImageRef, where: str, allowed_dir: Path | None, limits: ServerLimits) -> Image.Image:
    if ref.base64 is not None:
        return decode_base64_image(ref.base64, where, limits)
    return load_allowed_image(ref.path, where, allowed_dir, limits)


def build_requests(requests: list[StatesRequest], allowed_dir: Path | None,
                   limits: ServerLimits) -> list[VLMRequest]:
    """The engine's requests, images decoded (run off the event loop: decoding takes CPU time)."""
    out = []
    for i, r in enumerate(requests):
        if not r.prompt.strip():
            raise ClientError(400, f"requests[{i}].prompt is empty: give the VLM a question or instruction.")
        images = [load_image(im, f"requests[{i}].images[{j}]", allowed_dir, limits) for j, im in enumerate(r.images)]
        try:
            out.append(VLMRequest(r.prompt, images, system=r.system))
        except ValueError as err:
            raise ClientError(400, f"requests[{i}]: {err}") from None
    return out


def check_context(requests: list[VLMRequest], sampling: SamplingConfig, engine: HiddenStateEngine, counter) -> None:
    """Refuse a prompt that, with `max_new_tokens`, does not fit the model's context. A prompt of more characters
    than the context could ever hold is refused uncounted."""
    context = engine.context_length
    if counter is None or context is None:
        return
    for i, r in enumerate(requests):
        if len(r.prompt) + len(r.system or "") > 64 * context:  # no tokeniser packs 64 characters into a token
            raise ClientError(400, f"requests[{i}]: the prompt has {len(r.prompt)} characters, far more than this "
                                   f"model's context of {context} tokens.")
        try:
            n = counter(r)
        except Exception as err:
            raise ClientError(400, f"requests[{i}] cannot be tokenised ({type(err).__name__}: {err}).") from None
        if n + sampling.max_new_tokens > context:
            raise ClientError(400, f"requests[{i}]: the prompt is {n} tokens and max_new_tokens is "
                                   f"{sampling.max_new_tokens}; together they exceed this model's context of "
                                   f"{context} tokens (shorten the prompt or lower max_new_tokens).")
