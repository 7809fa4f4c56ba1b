"""`RemoteEngine`: the `HiddenStateEngine` of a `python -m thinkdiff serve` server, over HTTP (urllib only).

    engine = RemoteEngine("http://127.0.0.1:8765")
    states = engine.generate([VLMRequest("Describe the image.", [image])], layers=[-1])

Images travel as base64 PNG (lossless, mode kept), states come back as safetensors bytes in the server engine's
dtype. A 4xx answer (a bad request) raises ValueError with the server's message, like the in-process engines; a
5xx answer raises RuntimeError; an unreachable server raises ConnectionError.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.parse
import urllib.request

import torch

from ..errors import InputError
from .engine import HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteEngine(HiddenStateEngine):
    """A client of a ThinkDiff hidden-state server at `url`; `timeout` (seconds) bounds each HTTP call."""

    def __init__(self, url: str, timeout: float = 600.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputError(f"vlm.model={url!r}: the remote backend needs the server's URL, such as "
                             "http://127.0.0.1:8765 (start one with `python -m thinkdiff serve --model ...`).")
        self.url = url.rstrip("/")
        self.timeout = timeout
        # Honour HTTP(S)_PROXY for remote hosts, but never send loopback traffic to a proxy.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        info = json.loads(self._call("GET", "/health"))
        self.info = info
        self.model = info.get("model", "")
        self.backend = info.get("backend", "")
        self.num_layers = int(info["num_layers"])
        self.hidden_size = int(info["hidden_size"])
        self.max_images = info.get("max_images")
        self.max_requests = int(info.get("max_requests") or 64)

    def __repr__(self) -> str:
        return f"RemoteEngine({self.url!r}: {self.model} on {self.backend})"

    def generate(self, requests: list[VLMRequest], layers: list[int], sampling: SamplingConfig | None = None,
                 progress: bool = True) -> list[HiddenStates]:
        sampling = sampling or SamplingConfig()
        layers = self.resolve_layers(layers)
        self.check_requests(requests)
        sampling_json = {f: getattr(sampling, f) for f in ("max_new_tokens", "min_new_tokens", "do_sample",
                                                           "temperature", "top_p", "seed")}
        results = []
        # Chunk k samples as requests first_index + start... of one call: the same answers as in-process.
        for start in range(0, len(requests), self.max_requests):
            chunk = requests[start:start + self.max_requests]
            payload = {"requests": [_request_json(r) for r in chunk], "layers": layers,
                       "sampling": {**sampling_json, "first_index": sampling.first_index + start}}
            body = self._call("POST", "/generate", json.dumps(payload).encode())
            results.extend(decode_states(body, len(chunk), layers))
        return results

    # ------------------------------------------------------------------------------------------- HTTP

    def _call(self, method: str, path: str, data: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            message = _error_message(err)
            if 400 <= err.code < 500:
                raise InputError(f"The VLM server refused the call ({err.code}): {message}") from None
            raise RuntimeError(f"The VLM server at {self.url} failed ({err.code}): {message}") from None
        except urllib.error.URLError as err:
            raise ConnectionError(f"Cannot reach the VLM server at {self.url} ({err.reason}); is "
                                  "`python -m thinkdiff serve` running there?") from None
        except TimeoutError:
            raise ConnectionError(f"The VLM server at {self.url} did not answer within {self.timeout} s.") from None


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read()
    except Exception:
        body = b""
    try:
        return json.loads(body)["error"]
    except Exception:
        return body.decode("utf-8", "replace")[:500] or str(err.reason)


def _image_json(image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless, keeps the mode; level 1 is fast
    return {"base64": base64.b64encode(buf.getvalue()).decode("ascii")}


def _request_json(request: VLMRequest) -> dict:
    return {"prompt": request.prompt, "images": [_image_json(im) for im in request.images],
            "system": request.system}


def _metadata(body: bytes) -> dict:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + n]).get("__metadata__") or {}


def decode_states(body: bytes, n: int, layers: list[int] | None = None) -> list[HiddenStates]:
    """Parse a /generate response (safetensors bytes, keys `i.<name>`) into `n` HiddenStates; layer dicts follow
    the order of `layers` when given (as the in-process engines do), else ascending."""
    from safetensors.torch import load

    try:
        tensors = load(body)
        texts = json.loads(_metadata(body)["texts"])
    except Exception as err:
        raise RuntimeError(f"The VLM server sent an unreadable answer ({type(err).__name__}: {err}).") from None
    per: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        per[int(i)][name] = t
    if len(texts) != n or any("prompt_token_ids" not in p for p in per):
        raise RuntimeError(f"The VLM server answered {len(texts)} requests, expected {n}.")

    def pick(p, prefix):
        found = {int(k[len(prefix):]): v for k, v in p.items() if k.startswith(prefix)}
        order = [k for k in (layers or []) if k in found] + sorted(set(found) - set(layers or []))
        return {k: found[k] for k in order}

    return [HiddenStates(prompt_token_ids=p["prompt_token_ids"], output_token_ids=p["output_token_ids"], text=text,
                         input_embed=pick(p, "input_embed."), output_embed=pick(p, "output_embed."))
            for p, text in zip(per, texts)]
