"""The FastAPI application: routes, authentication, body limits and errors. `ThinkDiffService` holds what the
routes share (engine, pipeline, limits, worker, metrics); `create_app(service)` builds the app uvicorn runs.

Every refusal is JSON `{"error": message}` with a 4xx status (or 503 busy, 504 past the deadline); an engine
error that is the caller's fault (ValueError) is 400; anything else is a server bug: 500, logged with its
traceback. A client that hangs up while its call waits has the call cancelled before it reaches the engine.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..features import encode_states
from ..vlm.engine import HiddenStateEngine, SamplingConfig, VLMRequest
from .admission import (
    ClientError,
    ServerLimits,
    build_requests,
    check_context,
    check_counts,
    check_layers,
    check_sampling,
)
from .metrics import ServerMetrics
from .schemas import GenerateBody, ImageRef, ImagesBody, StatesRequest, describe
from .worker import EngineWorker

logger = logging.getLogger(__name__)


class _ClientGone(Exception):
    pass


@dataclass
class ThinkDiffService:
    engine: HiddenStateEngine
    limits: ServerLimits = field(default_factory=ServerLimits)
    pipeline: object | None = None  # a ThinkDiffPipeline: enables POST /v1/images/generations
    model_name: str = ""
    backend: str = ""
    allowed_image_dir: Path | None = None
    api_key: str | None = None

    def __post_init__(self):
        self.worker = EngineWorker(self.limits.max_queue, stuck_after=self.limits.request_timeout * 2)
        self.metrics = ServerMetrics(lambda: self.worker.pending)
        self.counter = self.engine.prompt_counter()
        self.stream = self.engine.continuous_batcher()  # vLLM: calls join one running batch
        self.decoding = threading.BoundedSemaphore(4)  # calls decoding images at once: bounds their memory

    def info(self) -> dict:
        e, lim = self.engine, self.limits
        return {"model": self.model_name, "backend": self.backend, "num_layers": e.num_layers,
                "hidden_size": e.hidden_size, "max_images": e.max_images, "context_length": e.context_length,
                "max_requests": lim.max_requests, "max_images_per_call": lim.max_images,
                "max_image_pixels": lim.max_image_pixels, "max_body_bytes": lim.max_body_bytes,
                "max_new_tokens": lim.max_new_tokens, "request_timeout": lim.request_timeout,
                "image_paths": self.allowed_image_dir is not None, "images_endpoint": self.pipeline is not None,
                "continuous_batching": self.stream is not None,
                "engine": {**self.worker.health(),
                           **({"running_requests": self.stream.running} if self.stream else {})}}

    def admit(self, requests: list[StatesRequest], sampling: SamplingConfig) -> list[VLMRequest]:
        """Decode the images and check the prompts' lengths (a worker thread, not the event loop)."""
        with self.decoding:
            built = build_requests(requests, self.allowed_image_dir, self.limits)
            check_context(built, sampling, self.engine, self.counter)
        return built

    def close(self) -> None:
        self.worker.close()
        if self.stream is not None:
            self.stream.close()

    async def states(self, request: Request, requests, layers, sampling):
        """The engine's HiddenStates for one call: through the continuous batcher when the engine has one (vLLM),
        else queued for the engine thread, one call at a time."""
        if self.stream is None:
            return await self.run(request, lambda: self.engine.generate(requests, layers, sampling, progress=False))
        future = self.stream.submit(requests, layers, sampling)
        deadline = time.monotonic() + self.limits.request_timeout
        return await self._wait(request, future, deadline, lambda: self.stream.cancel(future))

    async def run(self, request: Request, work):
        """Queue `work` for the engine thread and wait for it, watching the client and the deadline."""
        job = self.worker.submit(work, self.limits.request_timeout)
        return await self._wait(request, job.future, job.deadline, job.cancel)

    async def _wait(self, request: Request, future, deadline: float, cancel):
        waiting = asyncio.wrap_future(future)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                cancel()
                raise ClientError(504, f"No answer within this server's deadline of {self.limits.request_timeout:g} "
                                       "s per call.")
            done, _ = await asyncio.wait({waiting}, timeout=min(0.25, left))
            if done:
                return waiting.result()
            if await request.is_disconnected():
                cancel()  # a queued call never starts; a call running on vLLM leaves the batch
                raise _ClientGone


def create_app(service: ThinkDiffService) -> FastAPI:
    app = FastAPI(title="ThinkDiff", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown routes and methods, in our JSON shape
        hint = " Endpoints: GET /health, GET /metrics, POST /generate, POST /v1/images/generations."
        return refuse(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}.{hint}")

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), service.api_key.encode()):
            raise ClientError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.")

    async def read_json(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ClientError(415, f"Content-Type must be application/json, got {ctype or 'none'}.")
        declared = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if declared is None and not chunked:
            raise ClientError(411, "Content-Length is required.")
        too_large = ClientError(413, f"The body is larger than this server's {limits.max_body_bytes} bytes per call "
                                     "(send fewer requests or smaller images per call).")
        if declared is not None and int(declared) > limits.max_body_bytes:
            if int(declared) <= 2 * limits.max_body_bytes and "expect" not in request.headers:
                try:  # read and drop a body that is on its way, so the client sees the 413, not a reset
                    await asyncio.wait_for(_drain(request), limits.body_timeout)
                except (TimeoutError, ClientDisconnect):
                    pass
            raise too_large

        async def collect() -> bytes:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise too_large
            return bytes(body)

        try:
            body = await asyncio.wait_for(collect(), limits.body_timeout)
        except TimeoutError:
            raise ClientError(408, f"The body did not arrive within {limits.body_timeout:g} s.") from None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ClientError(400, f"The body is not valid JSON ({type(err).__name__}: {err}).") from None

    def validate(model: type[BaseModel], payload) -> BaseModel:
        try:
            return model.model_validate(payload)
        except ValidationError as err:
            raise ClientError(400, describe(err)) from None

    async def answer(endpoint: str, request: Request, handler):
        start = time.perf_counter()
        try:
            authorize(request)
            response = await handler()
        except ClientError as err:
            response = refuse(err.status, err.message)
        except _ClientGone:
            response = refuse(499, "The client closed the connection; the call was cancelled.")
        except ValueError as err:  # the engine or pipeline says the input is wrong
            response = refuse(400, str(err))
        except Exception as err:
            logger.exception("Server error on %s", endpoint)
            response = refuse(500, f"Server error: {type(err).__name__}: {err}")
        service.metrics.observe(endpoint, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health():
        info = service.info()
        return JSONResponse(info, status_code=503 if info["engine"]["state"] == "stuck" else 200)

    @app.get("/metrics")
    async def metrics(request: Request):
        async def handler():
            return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
        return await answer("/metrics", request, handler)

    @app.post("/generate")
    async def generate(request: Request):
        async def handler():
            body = validate(GenerateBody, await read_json(request))
            layers = check_layers(body.layers, service.engine)
            sampling = check_sampling(body.sampling, limits)
            check_counts(body.requests, service.engine, limits)
            requests = await run_in_threadpool(service.admit, body.requests, sampling)
            states = await service.states(request, requests, layers, sampling)
            service.metrics.tokens.labels("prompt").inc(sum(len(s.prompt_token_ids) for s in states))
            service.metrics.tokens.labels("generated").inc(sum(len(s.output_token_ids) for s in states))
            return Response(await run_in_threadpool(encode_states, states), media_type="application/octet-stream")
        return await answer("/generate", request, handler)

    @app.post("/v1/images/generations")
    async def images(request: Request):
        async def handler():
            pipe = service.pipeline
            if pipe is None:
                raise ClientError(404, "This server serves hidden states only; start it with `python -m thinkdiff "
                                       "serve --config PIPELINE.yaml` to generate images.")
            body = validate(ImagesBody, await read_json(request))
            wanted = StatesRequest(prompt=body.prompt, images=[ImageRef(base64=b) for b in body.images])
            check_counts([wanted], service.engine, limits)
            (vlm_request,) = await run_in_threadpool(service.admit, [wanted], pipe.sampling)
            size = body.width_height()
            if size and size[0] * size[1] > limits.max_image_pixels:
                raise ClientError(400, f"size {body.size} is above this server's limit of {limits.max_image_pixels} "
                                       "pixels per image.")
            settings = {"seed": body.seed, "num_inference_steps": body.num_inference_steps,
                        "guidance_scale": body.guidance_scale,
                        **({"width": size[0], "height": size[1]} if size else {})}
            settings = pipe.settings(**settings)
            # = pipe(prompt, images, ...): the VLM's states (through the batcher on vLLM), then aligner + decoder
            sampling = dataclasses.replace(pipe.sampling, seed=settings["seed"])
            layer = service.engine.resolve_layers([pipe.aligner.config.layer])
            start = time.perf_counter()
            (hs,) = await service.states(request, pipe.check_inputs(vlm_request.prompt, vlm_request.images), layer,
                                         sampling)
            timings = {"vlm": time.perf_counter() - start, "aligner": 0.0, "decoder": 0.0}
            images_out = await service.run(request, lambda: pipe.decode(hs, body.n, **settings, progress=False,
                                                                        timings=timings))
            service.metrics.images.inc(len(images_out))
            service.metrics.tokens.labels("generated").inc(len(hs.output_token_ids))
            data = await run_in_threadpool(lambda: [{"b64_json": png_base64(im)} for im in images_out])
            return JSONResponse({"created": int(time.time()), "data": data, "answer": hs.text, "timings": timings,
                                 "settings": settings})
        return await answer("/v1/images/generations", request, handler)

    return app


async def _drain(request: Request) -> None:
    async for _ in request.stream():
        pass


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
