"""`RemoteEngine`: the `HiddenStateEngine` of a `python -m thinkdiff serve` server, over HTTP (httpx).

    engine = RemoteEngine("http://127.0.0.1:8765")
    states = engine.generate([VLMRequest("Describe the image.", [image])], layers=[-1])

Images travel as base64 PNG (lossless, mode kept), states come back as safetensors bytes (features.decode_states)
in the server engine's dtype. Connection failures are retried (`retries` times, by httpx's transport), and so is a
503 (server busy) after a growing pause. A 4xx answer (a bad request) raises ValueError with the server's message,
like the in-process engines; a 5xx answer raises RuntimeError; an unreachable or silent server raises
ConnectionError. The API key comes from `api_key` or $THINKDIFF_API_KEY.
"""

from __future__ import annotations

import base64
import io
import os
import time
import urllib.parse

import httpx

from ..errors import InputError
from ..features import decode_states
from .engine import HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "THINKDIFF_API_KEY"


class RemoteEngine(HiddenStateEngine):
    """A client of a ThinkDiff server at `url`; `timeout` (seconds) bounds each HTTP call."""

    def __init__(self, url: str, timeout: float = 600.0, retries: int = 3, api_key: str | None = None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputError(f"vlm.model={url!r}: the remote backend needs the server's URL, such as "
                             "http://127.0.0.1:8765 (start one with `python -m thinkdiff serve --model ...`).")
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        key = api_key or os.environ.get(API_KEY_ENV)
        self._client = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            transport=httpx.HTTPTransport(retries=retries),
            headers={"Authorization": f"Bearer {key}"} if key else {},
            trust_env=parsed.hostname not in _LOOPBACK)  # proxies for remote hosts, never for loopback
        info = self._call("GET", "/health").json()
        self.info = info
        self.model = info.get("model", "")
        self.backend = info.get("backend", "")
        self.num_layers = int(info["num_layers"])
        self.hidden_size = int(info["hidden_size"])
        self.max_images = info.get("max_images")
        self.context_length = info.get("context_length")
        self.max_requests = int(info.get("max_requests") or 64)

    def __repr__(self) -> str:
        return f"RemoteEngine({self.url!r}: {self.model} on {self.backend})"

    def close(self) -> None:
        self._client.close()

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
            body = self._call("POST", "/generate", payload).content
            results.extend(decode_states(body, len(chunk), layers))
        return results

    # ------------------------------------------------------------------------------------------- HTTP

    def _call(self, method: str, path: str, payload: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self._client.request(method, path, json=payload)
            except httpx.TimeoutException:
                raise ConnectionError(f"The VLM server at {self.url} did not answer within {self.timeout} s.") \
                    from None
            except httpx.TransportError as err:
                raise ConnectionError(f"Cannot reach the VLM server at {self.url} ({type(err).__name__}: {err}); "
                                      "is `python -m thinkdiff serve` running there?") from None
            if response.status_code != 503 or attempt == self.retries:
                break
            time.sleep(0.5 * 2 ** attempt)  # busy: back off and retry
        if response.is_success:
            return response
        message = _error_message(response)
        if 400 <= response.status_code < 500:
            raise InputError(f"The VLM server refused the call ({response.status_code}): {message}")
        raise RuntimeError(f"The VLM server at {self.url} failed ({response.status_code}): {message}")


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]
    except Exception:
        return response.text[:500] or response.reason_phrase


def _image_json(image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless, keeps the mode; level 1 is fast
    return {"base64": base64.b64encode(buf.getvalue()).decode("ascii")}


def _request_json(request: VLMRequest) -> dict:
    return {"prompt": request.prompt, "images": [_image_json(im) for im in request.images],
            "system": request.system}
