"""The one thread that runs the engine's calls (and the decoder's, for images) in arrival order, one at a time,
never merged: a merged call makes a short request wait for a long one and, through padding, can change greedy
answers. (On vLLM, hidden-state calls go to the engine's continuous batcher instead: vlm/vllm_stream.py.)

A call waits in the queue with a deadline. One whose client has gone is cancelled there and never reaches the
engine; one still waiting at its deadline is answered 504 without running. `health()` tells a busy engine from a
stuck one (running one call for longer than `stuck_after` seconds).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .admission import ClientError

logger = logging.getLogger(__name__)


@dataclass
class Job:
    run: Callable[[], object]  # the engine work; its return value is the future's result
    deadline: float  # time.monotonic() after which the job is not started
    future: Future = field(default_factory=Future)

    def cancel(self) -> bool:
        """Drop the job if it has not started (its client has gone); True when it will never run."""
        return self.future.cancel()


class EngineWorker:
    def __init__(self, max_queue: int = 256, stuck_after: float = 600.0):
        self.max_queue, self.stuck_after = max_queue, stuck_after
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "expired": 0}
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="thinkdiff-engine", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[], object], timeout: float) -> Job:
        job = Job(run, time.monotonic() + timeout)
        with self._cond:
            if self._closed:
                raise ClientError(503, "The server is shutting down.")
            if len(self._queue) >= self.max_queue:
                raise ClientError(503, f"The server is busy ({len(self._queue)} calls waiting); retry later.")
            self._queue.append(job)
            self._cond.notify()
        return job

    @property
    def pending(self) -> int:
        """Calls waiting for the engine (not counting the one it is running)."""
        with self._cond:
            return sum(not j.future.cancelled() for j in self._queue)

    def health(self) -> dict:
        since = self._running_since
        busy = 0.0 if since is None else time.monotonic() - since
        state = "idle" if since is None else ("stuck" if busy > self.stuck_after else "busy")
        return {"state": state, "running_for_s": round(busy, 3), "queued": self.pending, **self.counts}

    def close(self, timeout: float | None = 30) -> None:
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            return self._queue.popleft() if self._queue else None

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                self.counts["cancelled"] += 1
                continue
            if time.monotonic() > job.deadline:
                self.counts["expired"] += 1
                job.future.set_exception(ClientError(504, "The call waited past its deadline for the engine; the "
                                                          "server is overloaded, retry later."))
                continue
            self._running_since = time.monotonic()
            try:
                result = job.run()
            except BaseException as err:  # the worker must outlive any one call
                self.counts["failed"] += 1
                job.future.set_exception(err)
            else:
                self.counts["done"] += 1
                job.future.set_result(result)
            finally:
                self._running_since = None
