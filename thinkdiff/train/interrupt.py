"""Ctrl-C and `kill` during training: finish the step in progress, write a checkpoint, stop with one line.

    with GracefulStop() as stop:
        for step in ...:
            ...                                  # a signal here only sets stop.requested
            if stop.should_stop(accelerator):    # every process agrees, so all leave at the same step
                save_checkpoint(...); raise TrainingInterrupted(...)

A second signal stops at once (KeyboardInterrupt); temp folders of a write in progress are removed on the way out
(atomic.py), and the next run removes any left by a harder kill (checkpoint.clean_stale_temp).
"""

from __future__ import annotations

import signal
import threading

import torch


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to continue."""


class GracefulStop:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, accelerator=None) -> bool:
        """Whether any process was signalled (one tiny all-reduce when several processes run)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
