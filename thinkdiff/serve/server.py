"""`HiddenStateServer`: the FastAPI app on uvicorn, in this thread (`serve_forever`, the CLI) or a background one
(`start`, tests and notebooks).

    with HiddenStateServer(engine, port=0).start() as server:
        RemoteEngine(server.url).generate(...)

uvicorn bounds what slow or many clients can hold: `limit_concurrency` (connections and running calls; more get
503), a listen backlog of 2048, idle keep-alive connections closed after 5 s; the app bounds body reads and calls
(admission.ServerLimits). Binding beyond loopback needs an API key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import uvicorn

from ..errors import ConfigError
from ..vlm.engine import HiddenStateEngine
from .admission import ServerLimits
from .app import ThinkDiffService, create_app

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765
API_KEY_ENV = "THINKDIFF_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class HiddenStateServer:
    def __init__(self, engine: HiddenStateEngine, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 pipeline=None, model_name: str = "", backend: str = "", allowed_image_dir: str | Path | None = None,
                 limits: ServerLimits | None = None, api_key: str | None = None, log_level: str = "warning"):
        if host not in LOOPBACK and not api_key:
            raise ConfigError(f"Serving on {host} reaches beyond this machine: give an API key (--api-key or "
                              f"{API_KEY_ENV}); clients send it as `Authorization: Bearer <key>`.")
        allowed = None
        if allowed_image_dir is not None:
            allowed = Path(allowed_image_dir).expanduser().resolve()
            if not allowed.is_dir():
                raise ConfigError(f"--allowed-image-dir {allowed_image_dir} is not a folder.")
        limits = limits or ServerLimits()
        self.service = ThinkDiffService(
            engine, limits, pipeline=pipeline,
            model_name=model_name or str(getattr(engine, "model_path", "") or type(engine).__name__),
            backend=backend or type(engine).__name__, allowed_image_dir=allowed, api_key=api_key)
        self.app = create_app(self.service)
        config = uvicorn.Config(self.app, host=host, port=port, limit_concurrency=limits.max_connections,
                                backlog=2048, timeout_keep_alive=5, log_level=log_level, lifespan="off",
                                access_log=log_level in ("debug", "info"))
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.host = host

    @property
    def engine(self) -> HiddenStateEngine:
        return self.service.engine

    @property
    def worker(self):
        return self.service.worker

    @property
    def url(self) -> str:
        host, port = self._uvicorn.servers[0].sockets[0].getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self, timeout: float = 30) -> HiddenStateServer:
        """Serve in a daemon thread; returns self once the socket listens."""
        self._thread = threading.Thread(target=self._uvicorn.run, name="thinkdiff-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server did not start on {self.host} (port in use?).")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C or SIGTERM."""
        try:
            self._uvicorn.run()
        finally:
            self.service.close()

    def close(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self.service.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def api_key_from(arg: str | None) -> str | None:
    return arg or os.environ.get(API_KEY_ENV) or None
